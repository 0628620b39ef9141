//! Workers: receive a batch, classify, look up, group per endpoint, deliver.
//!
//! One [`Worker`] runs pinned on one core. It owns one or more NIC receive queues, one NIC
//! transmit queue, and the sources (packet channels) of the endpoints it serves. Per loop
//! ([`Worker::poll_once`]) it takes one batch from each queue:
//!
//! - **Incoming** (from the NIC): the snapshot is loaded once per batch, all frames are
//!   classified, the keys looked up together ([`Snapshot::lookup_batch`]), and every frame gets
//!   a destination: its rule's endpoint (connection rule before listening rule), every
//!   endpoint (ARP, EAPOL, neighbour discovery), the last DHCP requester (unmatched DHCP
//!   answers), its first fragment's decision (later fragments), or a counted drop. Frames are
//!   then grouped per endpoint in fixed arrays and each endpoint's channel gets one
//!   [`crate::endpoint::EndpointSink::deliver`] call per batch.
//! - **Outgoing** (from an endpoint): loopback and spoofed sources are dropped, ARP-like
//!   frames go to the NIC and every other endpoint, DHCP requests make the sender the DHCP
//!   requester, frames to another local endpoint's MAC are matched like incoming frames,
//!   everything else goes to the NIC in one `send` call. Flows that no rule covers yet are
//!   learned (under the table lock, published) *before* the frames leave, so replies find
//!   their rule on every worker.
//!
//! Every frame ends in exactly one counter (see [`crate::counters`]).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use crate::counters::{CounterBatch, DropReason, WorkerCounters, MAX_ENDPOINTS};
use crate::endpoint::EndpointId;
use crate::frame::{classify, incoming_fast, Frame, FrameKind};
use crate::key::FlowKey;
use crate::offload::{GsoError, Sent, SoftwareOffload, VnetHdr};
use crate::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};
use crate::snapshot::{Snapshot, SnapshotReader};
use crate::table::Table;

/// How many first-fragment decisions one worker remembers.
pub const FRAGMENT_CAPACITY: usize = 4096;

/// How long a first-fragment decision is remembered (nanoseconds).
pub const FRAGMENT_TTL_NS: u64 = 5_000_000_000;

/// Per-NIC state shared by all workers of that NIC (atomics only).
#[derive(Debug)]
pub struct NicShared {
    dhcp_requester: AtomicU32,
}

const NO_ENDPOINT: u32 = u32::MAX;

/// Marks a frame of an outgoing batch that teaches no rule.
const NOT_LEARNING: u8 = u8::MAX;

impl Default for NicShared {
    fn default() -> Self {
        Self::new()
    }
}

impl NicShared {
    /// No DHCP requester yet.
    pub fn new() -> NicShared {
        NicShared {
            dhcp_requester: AtomicU32::new(NO_ENDPOINT),
        }
    }

    /// The endpoint that sent the last DHCP request, which receives unmatched DHCP answers.
    pub fn dhcp_requester(&self) -> Option<EndpointId> {
        match self.dhcp_requester.load(Relaxed) {
            NO_ENDPOINT => None,
            id => Some(EndpointId(id)),
        }
    }

    /// Records the endpoint that sent a DHCP request.
    pub fn set_dhcp_requester(&self, id: EndpointId) {
        self.dhcp_requester.store(id.0, Relaxed);
    }

    /// Forgets the DHCP requester if it is `id` (the endpoint was removed).
    pub fn forget_endpoint(&self, id: EndpointId) {
        let _ = self
            .dhcp_requester
            .compare_exchange(id.0, NO_ENDPOINT, Relaxed, Relaxed);
    }
}

/// How an idle worker sleeps: blocks until one of the file descriptors its queues gave
/// ([`RxQueue::prepare_wait`]) is readable, or the timeout passes. The daemon implements it
/// with `poll(2)`; without one, an idle worker polls every 50 µs.
pub trait IdleWait: Send {
    /// Blocks until one of `fds` is readable or `timeout` passed.
    fn wait(&mut self, fds: &[i32], timeout: Duration);
}

/// How long an idle worker keeps polling after its last frame before it sleeps, unless told
/// otherwise ([`Worker::with_idle_spin`]): zero, it sleeps after the first empty poll. A
/// spinning worker holds its core: on a shared core it delays the threads it just woke (the
/// application a frame was delivered to, the kernel-side worker) by up to the spin time, and
/// under load it competes with them for the whole time slice, while a sleeping worker is
/// woken (and preferred by the scheduler) when a frame arrives. Spinning pays off on
/// dedicated cores, where it saves the wake-up.
pub const DEFAULT_IDLE_SPIN: Duration = Duration::ZERO;
/// The longest sleep of an idle worker with an [`IdleWait`]: bounds how late it sees a
/// command or the stop flag.
const MAX_IDLE_WAIT: Duration = Duration::from_millis(10);

/// How often a running worker reads its NIC rings' drop counters from the kernel.
const RING_DROPS_INTERVAL: Duration = Duration::from_millis(500);

/// Changes to a running worker, sent by the control side; applied at the start of the next
/// loop.
pub enum WorkerCommand {
    /// Start serving this endpoint's outgoing frames from this source.
    AttachSource(EndpointId, Box<dyn RxQueue>),
    /// Stop serving the endpoint's sources (they are dropped).
    DetachSource(EndpointId),
}

impl std::fmt::Debug for WorkerCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerCommand::AttachSource(id, _) => write!(f, "AttachSource({id})"),
            WorkerCommand::DetachSource(id) => write!(f, "DetachSource({id})"),
        }
    }
}

/// Everything a worker is built from.
pub struct WorkerParts {
    /// The worker's index (0-based): selects its ring in every endpoint channel.
    pub id: usize,
    /// The NIC receive queues this worker polls.
    pub nic_rx: Vec<Box<dyn RxQueue>>,
    /// The NIC transmit queue this worker sends on.
    pub nic_tx: Box<dyn TxQueue>,
    /// The NIC's rule table: read through its snapshots, locked only to learn.
    pub table: Arc<Mutex<Table>>,
    /// State shared by all workers of the NIC.
    pub nic: Arc<NicShared>,
    /// This worker's counters (written only by it).
    pub counters: Arc<WorkerCounters>,
    /// Commands from the control side.
    pub commands: Receiver<WorkerCommand>,
}

/// One data-plane worker (see the module docs).
pub struct Worker {
    nic_rx: Vec<Box<dyn RxQueue>>,
    sources: Vec<(EndpointId, Box<dyn RxQueue>)>,
    commands: Receiver<WorkerCommand>,
    engine: Engine,
    idle_wait: Option<Box<dyn IdleWait>>,
    /// The fds of the last sleep (kept to avoid allocating per sleep).
    wait_fds: Vec<i32>,
    /// How long to keep polling after the last frame before sleeping.
    idle_spin: Duration,
    batch_wait: Duration,
}

/// What a frame of the batch in progress turns into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dest {
    /// Dropped for this reason.
    Drop(DropReason),
    /// Delivered to this endpoint.
    To(EndpointId),
    /// Its key waits for the batch lookup.
    Lookup,
    /// A DHCP answer whose key waits for the batch lookup.
    LookupDhcp,
    /// A later fragment: follows its first fragment.
    Fragment,
    /// Copied to every endpoint (incoming ARP and the like).
    Everyone,
    /// To the NIC.
    Nic,
    /// To the NIC and every endpoint except the sender.
    NicAndOthers,
}

/// Per-batch scratch space, allocated once.
struct Scratch {
    dest: [Dest; MAX_BATCH],
    /// Classified frames, only filled for fragments (first or later).
    parsed: [Option<Frame>; MAX_BATCH],
    keys: [FlowKey; MAX_BATCH],
    key_frame: [u8; MAX_BATCH],
    found: [Option<EndpointId>; MAX_BATCH],
    learn: [FlowKey; MAX_BATCH],
    macs: [[u8; 6]; MAX_BATCH],
}

impl Scratch {
    fn new() -> Box<Scratch> {
        Box::new(Scratch {
            dest: [Dest::Nic; MAX_BATCH],
            parsed: [None; MAX_BATCH],
            keys: [FlowKey::default(); MAX_BATCH],
            key_frame: [0; MAX_BATCH],
            found: [None; MAX_BATCH],
            learn: [FlowKey::default(); MAX_BATCH],
            macs: [[0; 6]; MAX_BATCH],
        })
    }
}

/// Frames of one batch grouped per destination endpoint, in fixed arrays.
struct Groups {
    /// Frame indices per endpoint slot.
    members: Box<[[u8; MAX_BATCH]; MAX_ENDPOINTS]>,
    /// Number of frames per endpoint slot.
    counts: Box<[u8; MAX_ENDPOINTS]>,
    /// Endpoint slots with at least one frame, in first-use order (the first `ntouched`).
    touched: Box<[u16; MAX_ENDPOINTS]>,
    /// Number of valid entries in `touched`.
    ntouched: usize,
}

impl Groups {
    fn new() -> Groups {
        Groups {
            members: boxed_array([0; MAX_BATCH]),
            counts: boxed_array(0),
            touched: boxed_array(0),
            ntouched: 0,
        }
    }

    /// Adds frame `i` to endpoint `ep`'s group. Endpoints beyond the grouping capacity (more
    /// than [`MAX_ENDPOINTS`] endpoints on one NIC) get the frame delivered on its own.
    #[inline(always)]
    fn add(&mut self, ep: EndpointId, i: usize, out: &mut Delivery<'_, '_>) {
        let slot = ep.index();
        if slot >= MAX_ENDPOINTS {
            out.deliver_one(ep, i);
            return;
        }
        let n = usize::from(self.counts[slot]);
        if n == 0 {
            // Each slot is touched once per batch, so ntouched < MAX_ENDPOINTS here;
            // slot < MAX_ENDPOINTS <= u16::MAX.
            self.touched[self.ntouched % MAX_ENDPOINTS] = slot as u16;
            self.ntouched += 1;
        }
        // A frame joins a group at most once and a batch has at most MAX_BATCH frames, so
        // n < MAX_BATCH (the mask only spares the bounds check).
        debug_assert!(n < MAX_BATCH);
        self.members[slot][n % MAX_BATCH] = i as u8;
        self.counts[slot] = (n + 1) as u8;
    }

    /// Delivers every group with one call per endpoint and empties the groups.
    fn deliver_all(&mut self, out: &mut Delivery<'_, '_>) {
        let mut list: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        let ntouched = std::mem::take(&mut self.ntouched);
        for &slot in &self.touched[..ntouched] {
            let slot = usize::from(slot);
            let n = usize::from(self.counts[slot]);
            self.counts[slot] = 0;
            let mut bytes = 0;
            for (dst, &i) in list.iter_mut().zip(&self.members[slot][..n]) {
                let frame = out.frames[usize::from(i)];
                bytes += frame.len();
                *dst = frame;
            }
            let ep = EndpointId(slot as u32);
            match out.offloads {
                None => out.deliver(ep, &list[..n], bytes),
                Some(all) => {
                    let mut offloads = [VnetHdr::PLAIN; MAX_BATCH];
                    for (dst, &i) in offloads.iter_mut().zip(&self.members[slot][..n]) {
                        *dst = all[usize::from(i)];
                    }
                    out.deliver_offloaded(ep, &list[..n], &offloads[..n], bytes);
                }
            }
        }
    }
}

/// A heap array of `N` copies of `value`, built without a large stack temporary.
fn boxed_array<T: Clone, const N: usize>(value: T) -> Box<[T; N]> {
    match vec![value; N].into_boxed_slice().try_into() {
        Ok(array) => array,
        Err(_) => unreachable!("a vector of N elements converts to [T; N]"),
    }
}

/// What delivering needs: the frames (and their offload metadata, if any frame has some),
/// the snapshot, the counters, the worker's index and its software offload converter.
struct Delivery<'f, 's> {
    frames: &'f [&'f [u8]],
    offloads: Option<&'f [VnetHdr]>,
    snap: &'s Snapshot,
    counts: &'s mut CounterBatch,
    worker: usize,
    software: &'s mut SoftwareOffload,
}

impl Delivery<'_, '_> {
    /// Delivers `frames` (of `bytes` bytes together) to endpoint `ep`.
    #[inline]
    fn deliver(&mut self, ep: EndpointId, frames: &[&[u8]], bytes: usize) {
        let Some(endpoint) = self.snap.endpoint(ep) else {
            self.counts
                .drop(DropReason::NoEndpoint, frames.len() as u64);
            return;
        };
        let accepted = endpoint.sink.deliver(self.worker, frames).min(frames.len());
        let bytes = if accepted == frames.len() {
            bytes
        } else {
            frames[..accepted].iter().map(|f| f.len()).sum()
        };
        count_delivered(self.counts, ep, frames.len(), accepted, bytes);
    }

    /// Delivers `frames` with their offload metadata to endpoint `ep`: whole when the
    /// endpoint takes metadata, otherwise plain frames as they are and the others as wire
    /// frames made in software (each such frame counts once, as delivered when all its wire
    /// frames were accepted).
    #[cold]
    #[inline(never)]
    fn deliver_offloaded(
        &mut self,
        ep: EndpointId,
        frames: &[&[u8]],
        offloads: &[VnetHdr],
        bytes: usize,
    ) {
        let Some(endpoint) = self.snap.endpoint(ep) else {
            self.counts
                .drop(DropReason::NoEndpoint, frames.len() as u64);
            return;
        };
        if offloads.iter().all(VnetHdr::is_plain) {
            return self.deliver(ep, frames, bytes);
        }
        if endpoint.sink.accepts_offloads() {
            let accepted = endpoint
                .sink
                .deliver_offloaded(self.worker, frames, offloads)
                .min(frames.len());
            let bytes = frames[..accepted].iter().map(|f| f.len()).sum();
            count_delivered(self.counts, ep, frames.len(), accepted, bytes);
            return;
        }
        let (worker, sink, counts) = (self.worker, &endpoint.sink, &mut *self.counts);
        self.software.send_as_wire_frames(
            frames,
            offloads,
            |wire| sink.deliver(worker, wire),
            |sent| match sent {
                Sent::Plain { frames, accepted } => {
                    let bytes = frames[..accepted].iter().map(|f| f.len()).sum();
                    count_delivered(counts, ep, frames.len(), accepted, bytes);
                }
                Sent::Offloaded { frame, result } => match result {
                    Ok(true) => counts.delivered(ep, 1, frame.len() as u64),
                    Ok(false) => counts.drop(DropReason::ChannelFull, 1),
                    Err(e) => counts.drop(offload_drop_reason(e), 1),
                },
            },
        );
    }

    /// Delivers frame `i` on its own (endpoints beyond the grouping capacity).
    #[cold]
    #[inline(never)]
    fn deliver_one(&mut self, ep: EndpointId, i: usize) {
        let frame = self.frames[i];
        match self.offloads {
            None => self.deliver(ep, &[frame], frame.len()),
            Some(all) => self.deliver_offloaded(ep, &[frame], &all[i..=i], frame.len()),
        }
    }
}

/// The worker's state apart from its queues (so a lent batch and the state can be borrowed at
/// the same time).
struct Engine {
    id: usize,
    nic_tx: Box<dyn TxQueue>,
    reader: SnapshotReader,
    table: Arc<Mutex<Table>>,
    nic: Arc<NicShared>,
    counters: Arc<WorkerCounters>,
    counts: CounterBatch,
    fragments: fragments::FragmentDecisions,
    scratch: Box<Scratch>,
    groups: Groups,
    software: SoftwareOffload,
}

fn lock_table(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panic elsewhere while holding the lock leaves the table usable (every change is
    // complete or not made); keep forwarding.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl Worker {
    /// A worker from its parts; it serves no endpoint source until told to.
    pub fn new(parts: WorkerParts) -> Worker {
        let reader = lock_table(&parts.table).reader();
        Worker {
            nic_rx: parts.nic_rx,
            sources: Vec::new(),
            commands: parts.commands,
            engine: Engine {
                id: parts.id,
                nic_tx: parts.nic_tx,
                reader,
                table: parts.table,
                nic: parts.nic,
                counters: parts.counters,
                counts: CounterBatch::new(),
                fragments: fragments::FragmentDecisions::new(FRAGMENT_CAPACITY, FRAGMENT_TTL_NS),
                scratch: Scratch::new(),
                groups: Groups::new(),
                software: SoftwareOffload::new(),
            },
            idle_wait: None,
            wait_fds: Vec::with_capacity(MAX_BATCH),
            idle_spin: DEFAULT_IDLE_SPIN,
            batch_wait: Duration::ZERO,
        }
    }

    /// The worker's index.
    pub fn id(&self) -> usize {
        self.engine.id
    }

    /// The worker's counters.
    pub fn counters(&self) -> &Arc<WorkerCounters> {
        &self.engine.counters
    }

    /// Endpoints whose sources this worker serves.
    pub fn sources(&self) -> impl Iterator<Item = EndpointId> + '_ {
        self.sources.iter().map(|(id, _)| *id)
    }

    fn apply(&mut self, command: WorkerCommand) {
        match command {
            WorkerCommand::AttachSource(id, source) => self.sources.push((id, source)),
            WorkerCommand::DetachSource(id) => self.sources.retain(|(s, _)| *s != id),
        }
    }

    /// One loop: applies waiting commands, then takes one batch from every NIC queue and
    /// every endpoint source and handles it. `now_ns` is a monotonic clock (for fragment
    /// expiry). Returns the number of frames handled.
    pub fn poll_once(&mut self, now_ns: u64) -> usize {
        while let Ok(command) = self.commands.try_recv() {
            self.apply(command);
        }
        let mut handled = 0;
        let engine = &mut self.engine;
        for rx in self.nic_rx.iter_mut() {
            let mut batch = FrameBatch::new();
            let n = rx.recv(&mut batch);
            if n > 0 {
                engine.incoming(batch.as_slice(), batch.offloads(), now_ns);
                handled += n;
            }
        }
        for (id, source) in self.sources.iter_mut() {
            let mut batch = FrameBatch::new();
            let n = source.recv(&mut batch);
            if n > 0 {
                engine.outgoing(*id, batch.as_slice(), batch.offloads(), now_ns);
                handled += n;
            }
        }
        engine.nic_tx.flush();
        handled
    }

    /// Gives the worker a way to sleep when idle (see [`IdleWait`]).
    pub fn with_idle_wait(mut self, waiter: Box<dyn IdleWait>) -> Worker {
        self.idle_wait = Some(waiter);
        self
    }

    /// Sets how long the worker keeps polling after its last frame before it sleeps
    /// ([`DEFAULT_IDLE_SPIN`] unless set; zero: it sleeps after the first empty poll).
    pub fn with_idle_spin(mut self, spin: Duration) -> Worker {
        self.idle_spin = spin;
        self
    }

    /// Sets how long the worker waits after a poll that found frames, but less than a full
    /// batch, before it polls again (zero, the default: at once). Like a NIC's adaptive
    /// interrupt moderation (ethtool's rx-usecs with adaptive-rx): frames arriving meanwhile
    /// are handled together, which saves wake-ups and system calls per frame (and lets the
    /// kernel's TAP take a flow's datagrams in one write), at the cost of up to that much
    /// latency. It waits only while traffic is dense, when at least one frame a wait arrived
    /// since the previous poll that found frames ([`dense_traffic`]): a lone frame after a
    /// quiet spell (a ping, a request) is handled, and the next one waited for, at once.
    pub fn with_batch_wait(mut self, wait: Duration) -> Worker {
        self.batch_wait = wait;
        self
    }

    /// Polls until `stop` is set. Busy-polls while there is traffic; once its polls found
    /// nothing for the idle spin time (by default at the first empty poll) it sleeps until a
    /// queue has frames (with an [`IdleWait`], at most 10 ms at a time) or, without one,
    /// polls every 50 µs.
    pub fn run(&mut self, stop: &AtomicBool) {
        let start = Instant::now();
        // When the current run of empty polls began (None: the last poll found frames).
        let mut idle_since: Option<Instant> = None;
        // When the last poll that found frames began.
        let mut frames_seen_at: Option<Instant> = None;
        let mut ring_drops_read = start;
        while !stop.load(Relaxed) {
            let now = Instant::now();
            let now_ns = u64::try_from(now.duration_since(start).as_nanos()).unwrap_or(u64::MAX);
            if now.duration_since(ring_drops_read) >= RING_DROPS_INTERVAL {
                ring_drops_read = now;
                self.read_ring_drops();
            }
            let handled = self.poll_once(now_ns);
            if handled > 0 {
                idle_since = None;
                let dense = frames_seen_at
                    .is_some_and(|t| dense_traffic(now - t, handled, self.batch_wait));
                frames_seen_at = Some(now);
                if handled < MAX_BATCH && dense && !self.batch_wait.is_zero() {
                    self.nap(self.batch_wait);
                }
                continue;
            }
            let since = *idle_since.get_or_insert(now);
            if now.duration_since(since) < self.idle_spin {
                std::hint::spin_loop();
            } else if !self.sleep_until_ready() {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Sleeps `wait` (for [`Worker::with_batch_wait`]): through the [`IdleWait`] with no file
    /// descriptor, or the thread's sleep without one.
    fn nap(&mut self, wait: Duration) {
        match self.idle_wait.as_mut() {
            Some(waiter) => waiter.wait(&[], wait),
            None => std::thread::sleep(wait),
        }
    }

    /// Adds what the kernel dropped at the worker's NIC receive rings since the last call to
    /// its counters (a syscall per queue: called about once a second).
    pub fn read_ring_drops(&mut self) {
        let drops: u64 = self.nic_rx.iter_mut().map(|q| q.take_ring_drops()).sum();
        self.engine.counters.add_ring_drops(drops);
    }

    /// Sleeps until one of the worker's queues has frames (bounded by [`MAX_IDLE_WAIT`]);
    /// false when it cannot (no [`IdleWait`], or a queue that cannot be waited on).
    fn sleep_until_ready(&mut self) -> bool {
        let Some(waiter) = self.idle_wait.as_mut() else {
            return false;
        };
        self.wait_fds.clear();
        let mut all = true;
        let queues = self
            .nic_rx
            .iter_mut()
            .chain(self.sources.iter_mut().map(|(_, q)| q));
        for q in queues {
            match q.prepare_wait() {
                Some(fd) => self.wait_fds.push(fd),
                None => {
                    all = false;
                    break;
                }
            }
        }
        if all && !self.wait_fds.is_empty() && self.commands.is_empty() {
            waiter.wait(&self.wait_fds, MAX_IDLE_WAIT);
        }
        for q in self
            .nic_rx
            .iter_mut()
            .chain(self.sources.iter_mut().map(|(_, q)| q))
        {
            q.finish_wait();
        }
        all && !self.wait_fds.is_empty()
    }
}

/// Whether `frames` found `since` the previous poll that found any are dense traffic for a
/// batch wait of `wait`: at least one frame per `wait` on average.
pub fn dense_traffic(since: Duration, frames: usize, wait: Duration) -> bool {
    since <= wait.saturating_mul(u32::try_from(frames).unwrap_or(u32::MAX))
}

impl Engine {
    /// Handles one batch from the NIC.
    fn incoming(&mut self, frames: &[&[u8]], offloads: Option<&[VnetHdr]>, now_ns: u64) {
        let n = frames.len().min(MAX_BATCH);
        let frames = &frames[..n];
        let snap = self.reader.load();
        let s = &mut *self.scratch;

        // 1. classify, collect keys
        let mut nkeys = 0;
        let mut any_fragment = false;
        let mut bytes = 0;
        for ((i, f), dest) in frames.iter().enumerate().zip(s.dest.iter_mut()) {
            bytes += f.len();
            // The commonest frames (plain IPv4 TCP/UDP) give their key straight into the
            // batch's key array; the rest goes through the full classifier.
            if let Some(kind) = incoming_fast(f, &mut s.keys[nkeys]) {
                s.key_frame[nkeys] = i as u8;
                nkeys += 1;
                *dest = if kind == FrameKind::DhcpAnswer {
                    Dest::LookupDhcp
                } else {
                    Dest::Lookup
                };
                continue;
            }
            *dest = match classify(f) {
                Err(reason) => Dest::Drop(reason),
                Ok(frame) => {
                    if frame.frag.is_some() {
                        s.parsed[i] = Some(frame);
                        any_fragment = true;
                    }
                    match frame.kind {
                        FrameKind::Arp | FrameKind::Eapol | FrameKind::NeighborDiscovery => {
                            Dest::Everyone
                        }
                        FrameKind::Fragment => Dest::Fragment,
                        _ if frame.dst_ip.is_loopback() || frame.src_ip.is_loopback() => {
                            Dest::Drop(DropReason::Loopback)
                        }
                        FrameKind::L4 | FrameKind::DhcpRequest | FrameKind::DhcpAnswer => {
                            s.keys[nkeys] = frame.incoming_key();
                            s.key_frame[nkeys] = i as u8;
                            nkeys += 1;
                            if frame.kind == FrameKind::DhcpAnswer {
                                Dest::LookupDhcp
                            } else {
                                Dest::Lookup
                            }
                        }
                    }
                }
            };
        }

        self.counts.nic_in(n as u64, bytes as u64);

        // 2. one lookup for the batch
        snap.lookup_batch(&s.keys[..nkeys], &mut s.found[..nkeys]);
        let resolve = |found: Option<EndpointId>, dest: Dest| match (found, dest) {
            (Some(ep), _) => Dest::To(ep),
            (None, Dest::LookupDhcp) => match self.nic.dhcp_requester() {
                Some(ep) => Dest::To(ep),
                None => Dest::Drop(DropReason::NoRule),
            },
            (None, _) => Dest::Drop(DropReason::NoRule),
        };
        if nkeys == n && !any_fragment {
            // Every frame waited for its own key, in frame order (key j is frame j): group
            // them straight from the lookup, without the later passes.
            let mut out = Delivery {
                frames,
                offloads,
                snap: &snap,
                counts: &mut self.counts,
                worker: self.id,
                software: &mut self.software,
            };
            for (i, (&found, &dest)) in s.found[..n].iter().zip(&s.dest[..n]).enumerate() {
                match resolve(found, dest) {
                    Dest::To(ep) => self.groups.add(ep, i, &mut out),
                    Dest::Drop(reason) => out.counts.drop(reason, 1),
                    // resolve gives nothing else; a leftover would be a bug: count it
                    _ => out.counts.drop(DropReason::NoRule, 1),
                }
            }
            self.groups.deliver_all(&mut out);
            drop(snap);
            self.counts.flush(&self.counters);
            return;
        }
        for j in 0..nkeys {
            let i = usize::from(s.key_frame[j]);
            s.dest[i] = resolve(s.found[j], s.dest[i]);
        }

        // 3. fragments, in frame order (a first fragment decides for later ones in the batch)
        if any_fragment {
            for i in 0..n {
                let Some(frame) = s.parsed[i].take() else {
                    continue;
                };
                let Some(frag) = frame.frag else { continue };
                if s.dest[i] == Dest::Fragment {
                    s.dest[i] = match self.fragments.follow(&frame, now_ns) {
                        None => Dest::Drop(DropReason::FragmentWithoutFirst),
                        Some(Some(ep)) => Dest::To(ep),
                        Some(None) => Dest::Drop(DropReason::NoRule),
                    };
                } else if frag.first && frag.more {
                    let decision = match s.dest[i] {
                        Dest::To(ep) => Some(ep),
                        _ => None,
                    };
                    self.fragments.record(&frame, decision, now_ns);
                }
            }
        }

        // 4. group per endpoint, deliver once per endpoint
        let mut out = Delivery {
            frames,
            offloads,
            snap: &snap,
            counts: &mut self.counts,
            worker: self.id,
            software: &mut self.software,
        };
        for i in 0..n {
            match s.dest[i] {
                Dest::To(ep) => self.groups.add(ep, i, &mut out),
                Dest::Everyone => {
                    let mut places = 0u64;
                    for ep in snap.endpoints() {
                        self.groups.add(ep.id, i, &mut out);
                        places += 1;
                    }
                    if places == 0 {
                        out.counts.drop(DropReason::NoEndpoint, 1);
                    } else {
                        out.counts.copies(places - 1);
                    }
                }
                Dest::Drop(reason) => out.counts.drop(reason, 1),
                // resolved above; a leftover would be a bug: count it rather than lose it
                Dest::Lookup
                | Dest::LookupDhcp
                | Dest::Fragment
                | Dest::Nic
                | Dest::NicAndOthers => out.counts.drop(DropReason::NoRule, 1),
            }
        }
        self.groups.deliver_all(&mut out);
        drop(snap);
        self.counts.flush(&self.counters);
    }

    /// Handles one batch that endpoint `src` sent.
    fn outgoing(
        &mut self,
        src: EndpointId,
        frames: &[&[u8]],
        offloads: Option<&[VnetHdr]>,
        _now_ns: u64,
    ) {
        let n = frames.len().min(MAX_BATCH);
        let frames = &frames[..n];
        let mut snap = self.reader.load();
        let s = &mut *self.scratch;
        let bytes: usize = frames.iter().map(|f| f.len()).sum();
        self.counts.sent_by(src, n as u64, bytes as u64);
        if snap.endpoint(src).is_none() {
            // removed endpoint whose source is still attached
            self.counts.drop(DropReason::NoEndpoint, n as u64);
            self.counts.flush(&self.counters);
            return;
        }

        // 1. classify, validate, decide; collect what to learn
        let mut nlearn = 0;
        let mut nmacs = 0;
        for (i, f) in frames.iter().enumerate() {
            s.key_frame[i] = NOT_LEARNING;
            let frame = match classify(f) {
                Err(reason) => {
                    s.dest[i] = Dest::Drop(reason);
                    continue;
                }
                Ok(frame) => frame,
            };
            let src_mac = frame.src_mac;
            if src_mac[0] & 1 == 0
                && snap.endpoint_by_mac(&src_mac).is_none()
                && nmacs < MAX_BATCH
                && !s.macs[..nmacs].contains(&src_mac)
            {
                s.macs[nmacs] = src_mac;
                nmacs += 1;
            }
            s.dest[i] = match frame.kind {
                FrameKind::Arp | FrameKind::Eapol | FrameKind::NeighborDiscovery => {
                    Dest::NicAndOthers
                }
                FrameKind::DhcpRequest => {
                    self.nic.set_dhcp_requester(src);
                    Dest::Nic
                }
                _ if frame.dst_ip.is_loopback() || frame.src_ip.is_loopback() => {
                    Dest::Drop(DropReason::Loopback)
                }
                FrameKind::L4 | FrameKind::DhcpAnswer | FrameKind::Fragment => {
                    let key = frame.outgoing_key();
                    let exact = snap.rule(&key);
                    let listening = snap.rule(&key.listening());
                    let foreign = |r: Option<crate::snapshot::RuleEntry>| {
                        r.is_some_and(|r| r.endpoint != src)
                    };
                    if foreign(exact) || foreign(listening) {
                        Dest::Drop(DropReason::SpoofedSource)
                    } else {
                        // Learn the flow unless it leaves from the sender's own listening
                        // rule or has its rule already. Later fragments carry no ports.
                        if frame.kind == FrameKind::L4 && exact.is_none() && listening.is_none() {
                            let j = match s.learn[..nlearn].iter().position(|k| *k == key) {
                                Some(j) => j,
                                None => {
                                    s.learn[nlearn] = key;
                                    nlearn += 1;
                                    nlearn - 1
                                }
                            };
                            s.key_frame[i] = j as u8;
                        }
                        match snap.endpoint_by_mac(&frame.dst_mac) {
                            None => Dest::Nic,
                            Some(owner) if owner == src => Dest::Drop(DropReason::Bounce),
                            Some(_) => match snap.lookup(&frame.incoming_key()) {
                                Some(ep) if ep == src => Dest::Drop(DropReason::Bounce),
                                Some(ep) => Dest::To(ep),
                                None => Dest::Drop(DropReason::NoRule),
                            },
                        }
                    }
                }
            };
        }

        // 2. slow path: learn, publish, reload; before any frame leaves
        if nlearn > 0 || nmacs > 0 {
            drop(snap);
            let mut lost = [false; MAX_BATCH];
            let mut any_lost = false;
            {
                let mut table = lock_table(&self.table);
                let mut changed = false;
                for (j, key) in s.learn[..nlearn].iter().enumerate() {
                    if table.learn(*key, src) {
                        changed = true;
                    } else if table.rule(key).is_some_and(|r| r.endpoint != src) {
                        // Another worker learned the key for another endpoint since our
                        // snapshot: first writer wins, our frame must not leave under its rule.
                        lost[j] = true;
                        any_lost = true;
                    }
                }
                // Every writer publishes right after its change, so the last published
                // snapshot tells whether a MAC is taken (first writer wins here too).
                let published = self.reader.load();
                for mac in &s.macs[..nmacs] {
                    if published.endpoint_by_mac(mac).is_none() && table.learn_mac(*mac, src) {
                        changed = true;
                    }
                }
                drop(published);
                if changed {
                    table.publish();
                }
            }
            snap = self.reader.load();
            if any_lost {
                for i in 0..n {
                    let j = s.key_frame[i];
                    if j != NOT_LEARNING && lost[usize::from(j)] {
                        s.dest[i] = Dest::Drop(DropReason::SpoofedSource);
                    }
                }
            }
        }

        // 3. to the NIC in one call; local deliveries grouped per endpoint
        let mut to_nic: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        let mut to_nic_offloads = [VnetHdr::PLAIN; MAX_BATCH];
        let mut nnic = 0;
        let mut out = Delivery {
            frames,
            offloads,
            snap: &snap,
            counts: &mut self.counts,
            worker: self.id,
            software: &mut self.software,
        };
        for (i, &frame) in frames.iter().enumerate() {
            match s.dest[i] {
                Dest::Nic => {
                    to_nic[nnic] = frame;
                    if let Some(all) = offloads {
                        to_nic_offloads[nnic] = all[i];
                    }
                    nnic += 1;
                }
                Dest::NicAndOthers => {
                    to_nic[nnic] = frame;
                    if let Some(all) = offloads {
                        to_nic_offloads[nnic] = all[i];
                    }
                    nnic += 1;
                    for ep in snap.endpoints() {
                        if ep.id != src {
                            self.groups.add(ep.id, i, &mut out);
                            out.counts.copies(1);
                        }
                    }
                }
                Dest::To(ep) => self.groups.add(ep, i, &mut out),
                Dest::Drop(reason) => out.counts.drop(reason, 1),
                Dest::Lookup | Dest::LookupDhcp | Dest::Fragment | Dest::Everyone => {
                    out.counts.drop(DropReason::NoRule, 1)
                }
            }
        }
        if nnic > 0 {
            let offloaded =
                offloads.is_some() && !to_nic_offloads[..nnic].iter().all(VnetHdr::is_plain);
            if offloaded {
                send_offloaded_to_nic(
                    &mut *self.nic_tx,
                    out.software,
                    out.counts,
                    &to_nic[..nnic],
                    &to_nic_offloads[..nnic],
                );
            } else {
                let accepted = self.nic_tx.send(&to_nic[..nnic]).min(nnic);
                count_sent(out.counts, &to_nic[..nnic], accepted);
            }
        }
        self.groups.deliver_all(&mut out);
        drop(snap);
        self.counts.flush(&self.counters);
    }
}

/// Sends frames with offload metadata to the NIC: whole when its queue takes them, otherwise
/// plain frames as they are and the others as wire frames made in software (each counts once:
/// sent when all its wire frames were accepted).
#[cold]
#[inline(never)]
fn send_offloaded_to_nic(
    nic_tx: &mut dyn TxQueue,
    software: &mut SoftwareOffload,
    counts: &mut CounterBatch,
    frames: &[&[u8]],
    offloads: &[VnetHdr],
) {
    if nic_tx.accepts_offloads() {
        let accepted = nic_tx.send_offloaded(frames, offloads).min(frames.len());
        count_sent(counts, frames, accepted);
        return;
    }
    software.send_as_wire_frames(
        frames,
        offloads,
        |wire| nic_tx.send(wire),
        |sent| match sent {
            Sent::Plain { frames, accepted } => count_sent(counts, frames, accepted),
            Sent::Offloaded { frame, result } => match result {
                Ok(true) => counts.nic_out(1, frame.len() as u64),
                Ok(false) => counts.drop(DropReason::TxFull, 1),
                Err(e) => counts.drop(offload_drop_reason(e), 1),
            },
        },
    );
}

/// Counts `accepted` of `offered` frames (of `bytes` bytes) delivered to `ep`, the rest as
/// refused by its channel.
fn count_delivered(
    counts: &mut CounterBatch,
    ep: EndpointId,
    offered: usize,
    accepted: usize,
    bytes: usize,
) {
    counts.delivered(ep, accepted as u64, bytes as u64);
    if accepted < offered {
        counts.drop(DropReason::ChannelFull, (offered - accepted) as u64);
    }
}

/// Counts the first `accepted` of `frames` as sent to the NIC, the rest as refused by it.
fn count_sent(counts: &mut CounterBatch, frames: &[&[u8]], accepted: usize) {
    let bytes: usize = frames[..accepted].iter().map(|f| f.len()).sum();
    counts.nic_out(accepted as u64, bytes as u64);
    counts.drop(DropReason::TxFull, (frames.len() - accepted) as u64);
}

/// The drop counter for a frame whose offload metadata could not be carried out.
fn offload_drop_reason(e: GsoError) -> DropReason {
    match e {
        GsoError::Unsupported => DropReason::Unsupported,
        GsoError::Truncated => DropReason::Truncated,
        GsoError::BadHeader => DropReason::Malformed,
    }
}

/// The worker's memory of first-fragment decisions: a [`crate::frag::FragTable`] (bounded,
/// all memory allocated up front, expiring; when full it evicts its oldest entry, counted in
/// its `evictions`). A decision is kept until it expires, not dropped at the last fragment, so
/// a middle fragment that arrives after the last one still follows its first.
mod fragments {
    use crate::endpoint::EndpointId;
    use crate::frag::{FragKey, FragTable};
    use crate::frame::Frame;

    /// First-fragment decisions (`None`: the first fragment was dropped).
    pub(super) struct FragmentDecisions {
        table: FragTable<Option<EndpointId>>,
    }

    impl FragmentDecisions {
        pub(super) fn new(capacity: usize, ttl_ns: u64) -> FragmentDecisions {
            FragmentDecisions {
                table: FragTable::new(capacity, ttl_ns),
            }
        }

        /// Remembers the decision for a first fragment that has more to come.
        pub(super) fn record(&mut self, frame: &Frame, decision: Option<EndpointId>, now_ns: u64) {
            if let Some(k) = FragKey::from_frame(frame) {
                self.table.insert(k, decision, now_ns);
            }
        }

        /// The decision of a later fragment's first fragment, if remembered.
        pub(super) fn follow(&mut self, frame: &Frame, now_ns: u64) -> Option<Option<EndpointId>> {
            FragKey::from_frame(frame).and_then(|k| self.table.get(&k, now_ns))
        }
    }
}

#[cfg(test)]
mod tests;
