//! The shared-memory packet channel, switch side.
//!
//! [`ShmChannel::create`] makes a sealed memfd holding one switch-to-client ring per worker and
//! one client-to-switch ring (layout, ring protocol and wake-ups: [`usnetd_client::shm`]), plus
//! two eventfds. It returns what to hand to the client ([`ShmHandover`]), the sink the workers
//! deliver into ([`ShmSink`]: worker `w` produces into ring `w` only) and the source a worker
//! reads the client's frames from ([`ShmSource`]).
//!
//! The client can write anything into the shared memory at any time. The switch never reads
//! the header back, validates every index and length it reads (counting errors in
//! [`RingErrors`]), and copies each client frame out of shared memory before the data plane
//! looks at it, so a client cannot change a frame after the switch has validated it.

use std::cell::UnsafeCell;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use usnetd_client::shm::{
    eventfd_drain, eventfd_new, eventfd_signal, ReadError, RingConsumer, RingErrors, RingProducer,
    SharedRegion, ShmGeometry, SLOT_HEADER_SIZE,
};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue, MAX_BATCH};

/// What the client needs to attach: the memfd and the two eventfds (duplicates of the
/// switch's; send all three by SCM_RIGHTS in this order: memfd, to-client, to-switch).
pub struct ShmHandover {
    /// The shared memory (sealed against shrinking and growing).
    pub memfd: OwnedFd,
    /// Signalled by the switch when the client asked for a wake-up.
    pub to_client_event: OwnedFd,
    /// Signalled by the client when the switch asked for a wake-up.
    pub to_switch_event: OwnedFd,
}

impl ShmHandover {
    /// The fds in handover order: memfd, to-client eventfd, to-switch eventfd.
    pub fn fds(&self) -> [BorrowedFd<'_>; 3] {
        [
            self.memfd.as_fd(),
            self.to_client_event.as_fd(),
            self.to_switch_event.as_fd(),
        ]
    }
}

/// The most invalid slots one [`ShmSource::recv`] call skips before returning.
const MAX_BAD_SLOTS_PER_RECV: usize = 4 * MAX_BATCH;

/// Creates shared-memory channels.
pub struct ShmChannel;

impl ShmChannel {
    /// Creates a channel with one switch-to-client ring per worker, `slots` slots per ring (a
    /// power of two, 2..=65536) of `slot_size` bytes (a multiple of 64, 128..=65536; frames
    /// up to `slot_size - 8` bytes).
    pub fn create(
        workers: usize,
        slots: usize,
        slot_size: usize,
    ) -> io::Result<(ShmHandover, ShmSink, ShmSource)> {
        let invalid = |what| io::Error::new(io::ErrorKind::InvalidInput, what);
        let workers = u32::try_from(workers).map_err(|_| invalid("too many workers"))?;
        let slots = u32::try_from(slots).map_err(|_| invalid("too many slots"))?;
        let slot_size = u32::try_from(slot_size).map_err(|_| invalid("slot too large"))?;
        let max_frame = slot_size.saturating_sub(SLOT_HEADER_SIZE);
        let geometry = ShmGeometry::new(workers, slots, slot_size, max_frame)?;
        let size = geometry.total_size();

        let memfd = memfd_create(size)?;
        let region = Arc::new(SharedRegion::map(memfd.as_fd(), size as usize)?);
        region.write_header(&geometry.header());

        let to_client = Arc::new(eventfd_new()?);
        let to_switch = eventfd_new()?;
        let handover = ShmHandover {
            memfd,
            to_client_event: to_client.try_clone()?,
            to_switch_event: to_switch.try_clone()?,
        };
        let lost = || io::Error::other("ring outside the mapping");
        let rings = (0..geometry.to_client_rings())
            .map(|r| {
                RingProducer::new(region.clone(), &geometry, r)
                    .map(|p| PaddedRing(Exclusive::new(p)))
                    .ok_or_else(lost)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let consumer =
            RingConsumer::new(region, &geometry, geometry.to_switch_ring()).ok_or_else(lost)?;
        let max_frame = geometry.max_frame() as usize;
        let sink = ShmSink {
            rings: rings.into_boxed_slice(),
            event: to_client,
        };
        let source = ShmSource {
            ring: consumer,
            event: to_switch,
            pool: vec![0u8; max_frame * MAX_BATCH].into_boxed_slice(),
            max_frame,
            armed: false,
        };
        Ok((handover, sink, source))
    }
}

/// A sealed memfd of `size` bytes: the client cannot shrink it (which would make the switch
/// fault on access) or grow it.
fn memfd_create(size: u64) -> io::Result<OwnedFd> {
    let size = libc::off_t::try_from(size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mapping too large"))?;
    // SAFETY: the name is a NUL-terminated literal; on success we own the returned fd.
    let fd = unsafe {
        libc::memfd_create(
            c"usnetd-shm".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is fresh and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate and fcntl on an fd we own.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), size) < 0 {
            return Err(io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// A ring producer on its own cache lines, so workers' rings do not share lines.
#[repr(align(128))]
struct PaddedRing(Exclusive<RingProducer>);

/// A value used by one thread at a time, claimed with one atomic flag. The data path never
/// waits for it: [`Exclusive::try_with`] gives up at once when another thread holds it.
struct Exclusive<T> {
    busy: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: every access to `value` happens inside `try_with`, between claiming `busy`
// (compare-exchange, Acquire) and giving it back (Release), so no two threads ever touch the
// value at once and each sees the previous holder's writes; the value may move between
// threads, hence `T: Send`.
unsafe impl<T: Send> Sync for Exclusive<T> {}

impl<T> Exclusive<T> {
    fn new(value: T) -> Exclusive<T> {
        Exclusive {
            busy: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` on the value if no other thread holds it; `None` (and `f` not run) otherwise.
    fn try_with<R>(&self, f: impl FnOnce(&mut T) -> R) -> Option<R> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        /// Gives the value back when dropped, also if `f` panics.
        struct GiveBack<'a>(&'a AtomicBool);
        impl Drop for GiveBack<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _give_back = GiveBack(&self.busy);
        // SAFETY: `busy` was claimed above and is given back only when `_give_back` drops,
        // after `f` returned; until then this is the only reference to the value.
        Some(f(unsafe { &mut *self.value.get() }))
    }

    /// Runs `f` on the value, yielding until no other thread holds it (not for the data path:
    /// the control thread reading counters).
    fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut f = Some(f);
        loop {
            if let Some(Some(r)) = self.try_with(|v| f.take().map(|f| f(v))) {
                return r;
            }
            std::thread::yield_now();
        }
    }
}

/// The switch's sending side: one ring per worker.
///
/// Worker `w` delivers into ring `w` (taken modulo the ring count if a caller passes a larger
/// index). Each ring is claimed with one atomic flag per batch, which in normal operation only
/// its worker ever takes; a second caller with the same worker index is refused at once (its
/// frames count as refused by the channel) rather than waiting, so the ring stays
/// single-producer and no worker ever blocks on it.
pub struct ShmSink {
    rings: Box<[PaddedRing]>,
    event: Arc<OwnedFd>,
}

impl ShmSink {
    /// Errors found in what the client wrote, plus frames refused as oversize, over all rings.
    pub fn errors(&self) -> RingErrors {
        let mut e = RingErrors::default();
        for r in self.rings.iter() {
            e.add(&r.0.with(|p| p.errors()));
        }
        e
    }
}

impl EndpointSink for ShmSink {
    fn deliver(&self, worker: usize, frames: &[&[u8]]) -> usize {
        let ring = &self.rings[worker % self.rings.len()];
        ring.0
            .try_with(|producer| {
                let n = producer.push_batch(frames);
                if n > 0 && producer.needs_wakeup() {
                    eventfd_signal(self.event.as_fd());
                }
                n
            })
            .unwrap_or(0)
    }
}

/// The switch's receiving side: the client-to-switch ring. Frames are copied into a private
/// pool and lent from there.
pub struct ShmSource {
    ring: RingConsumer,
    event: OwnedFd,
    pool: Box<[u8]>,
    max_frame: usize,
    /// A wake-up request is armed (between `prepare_wait` and `finish_wait`).
    armed: bool,
}

impl ShmSource {
    /// The eventfd the client signals after [`Self::arm_wakeup`] returned `true`.
    pub fn event_fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    /// Asks the client to signal [`Self::event_fd`] when it sends; returns whether the ring is
    /// still empty (safe to sleep). Call [`Self::disarm_wakeup`] after waking.
    pub fn arm_wakeup(&mut self) -> bool {
        self.ring.arm_wakeup()
    }

    /// Withdraws the wake-up request and resets the eventfd.
    pub fn disarm_wakeup(&mut self) {
        self.ring.disarm_wakeup();
        eventfd_drain(self.event.as_fd());
    }

    /// Errors found in what the client wrote (impossible indices, bad lengths).
    pub fn errors(&self) -> RingErrors {
        self.ring.errors()
    }
}

impl RxQueue for ShmSource {
    fn prepare_wait(&mut self) -> Option<i32> {
        // Armed: the client signals the eventfd with its next frame. Not armed (the ring
        // already holds frames): keep polling.
        if self.arm_wakeup() {
            self.armed = true;
            Some(self.event_fd().as_raw_fd())
        } else {
            self.disarm_wakeup();
            None
        }
    }

    fn finish_wait(&mut self) {
        if self.armed {
            self.armed = false;
            self.disarm_wakeup();
        }
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let want = MAX_BATCH - batch.len();
        let buf = self.max_frame;
        let mut lens = [0usize; MAX_BATCH];
        let mut got = 0;
        // Bounded: at most `want` frames and `MAX_BAD_SLOTS_PER_RECV` bad slots per call, so a
        // client producing garbage as fast as it can cannot hold the worker here.
        let mut bad = 0;
        while got < want && bad < MAX_BAD_SLOTS_PER_RECV {
            let dst = &mut self.pool[got * buf..(got + 1) * buf];
            match self.ring.read_next(dst) {
                Ok(n) => {
                    lens[got] = n;
                    got += 1;
                }
                Err(ReadError::BadLength) => bad += 1,
                Err(ReadError::Empty) => break,
            }
        }
        // The frames are copied out: give the slots back at once.
        self.ring.release();
        let pool: &'a [u8] = &self.pool;
        let mut pushed = 0;
        for (i, &len) in lens.iter().take(got).enumerate() {
            if batch.push(&pool[i * buf..i * buf + len]) {
                pushed += 1;
            }
        }
        pushed
    }
}

#[cfg(test)]
mod tests {
    use super::Exclusive;
    use std::sync::Arc;

    #[test]
    fn exclusive_value_is_held_by_one_thread_at_a_time_and_never_waited_for() {
        let cell = Arc::new(Exclusive::new((0u64, false)));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let cell = Arc::clone(&cell);
                std::thread::spawn(move || {
                    let mut done = 0u64;
                    for _ in 0..200_000 {
                        let got = cell.try_with(|(count, inside)| {
                            assert!(!*inside, "two holders at once");
                            *inside = true;
                            *count += 1;
                            *inside = false;
                        });
                        done += u64::from(got.is_some());
                    }
                    done
                })
            })
            .collect();
        let done: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(cell.with(|(count, _)| *count), done);
        // Held: another claim gives up at once.
        cell.try_with(|_| assert!(cell.try_with(|_| ()).is_none()))
            .unwrap();
    }
}
