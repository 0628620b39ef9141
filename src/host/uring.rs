//! Batched system calls through io_uring: the writes a worker makes to the kernel's TAP for one
//! batch of frames, and the reads of a macvtap queue, submitted with one system call instead
//! of one writev(2) or read(2) each.
//!
//! A write to a TAP runs the kernel's receive path inside the writer's system call; on a VM
//! with speculative-execution mitigations the entry and exit of that call alone cost about a
//! microsecond. A worker's batch for the kernel becomes up to [`MAX_BATCH`] writes (one per
//! super-packet or lone frame), so [`BatchRing::writev_batch`] queues them all as `WRITEV`
//! submissions of one ring and enters the kernel once. The TAP's descriptors are non-blocking,
//! so io_uring issues each write inline, in submission order, during that one call (a full TAP
//! answers `EAGAIN` in the write's completion instead of waiting), and the frames of a flow
//! keep their order.
//!
//! Each worker thread has its own ring ([`with_thread_ring`]), made on its first batch, so no
//! ring is shared and no lock is taken. Where io_uring is not available (an old kernel,
//! `kernel.io_uring_disabled`, a seccomp filter) the ring cannot be made and the caller writes
//! with writev(2) as before.
//!
//! The one `unsafe` is pushing submissions that point into the caller's buffers; it is sound
//! because [`BatchRing::writev_batch`] returns only after the kernel has completed every one
//! of them (or never took them).

use std::cell::RefCell;
use std::io;
use std::io::IoSlice;
use std::ops::Range;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
use usnetd_shards::port::MAX_BATCH;

/// Submissions one ring holds: the writes of one batch.
const RING_ENTRIES: u32 = MAX_BATCH as u32;

/// How often io_uring_enter(2) may fail for want of resources (or be interrupted) in one batch
/// before the ring is given up.
const TRANSIENT_RETRIES: u32 = 1000;

/// How often a failing io_uring_enter(2) is retried while writes it took are still in flight
/// before the process gives up (see [`BatchRing::writev_batch`]).
const IN_FLIGHT_RETRIES: u32 = 100_000;

/// One io_uring used to submit a batch of writes or reads at once.
pub struct BatchRing {
    ring: IoUring,
}

impl std::fmt::Debug for BatchRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchRing").finish_non_exhaustive()
    }
}

impl BatchRing {
    /// Makes a ring for [`MAX_BATCH`] writes at a time.
    pub fn new() -> io::Result<BatchRing> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(RING_ENTRIES)
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        Ok(BatchRing { ring })
    }

    /// Writes, for each range in `writes`, the slices `iovs[range]` to `fd` as one writev,
    /// all submitted together (in chunks of [`MAX_BATCH`]), and stores each write's result in
    /// `results` (bytes written, or a negative errno), which must be at least as long as
    /// `writes`. Returns once the kernel is done with every write it took; an `Err` means the
    /// ring failed and must not be used again (writes without a result were not made: their
    /// results are `-ECANCELED`).
    pub fn writev_batch(
        &mut self,
        fd: RawFd,
        iovs: &[IoSlice<'_>],
        writes: &[Range<usize>],
        results: &mut [i32],
    ) -> io::Result<()> {
        assert!(results.len() >= writes.len(), "a result for every write");
        results[..writes.len()].fill(-libc::ECANCELED);
        for (chunk, base) in writes.chunks(MAX_BATCH).zip((0..).step_by(MAX_BATCH)) {
            {
                let mut sq = self.ring.submission();
                for (k, range) in chunk.iter().enumerate() {
                    let slices = &iovs[range.clone()];
                    let entry = opcode::Writev::new(
                        types::Fd(fd),
                        slices.as_ptr().cast::<libc::iovec>(),
                        slices.len() as u32,
                    )
                    .rw_flags(libc::RWF_NOWAIT)
                    .build()
                    .user_data((base + k) as u64);
                    // SAFETY: the entry points to `slices` (IoSlice is ABI-compatible with
                    // iovec) and, through them, to the caller's frames, all borrowed for this
                    // call; the loop below returns only when the kernel has completed every
                    // entry it took, and on an error the ring is dropped by the caller before
                    // anything could submit the entries it did not take. The ring is empty
                    // here (every earlier entry was completed), so a chunk of at most
                    // RING_ENTRIES fits.
                    unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("io_uring full"))?;
                }
            }
            self.complete(chunk.len(), results)?;
        }
        Ok(())
    }

    /// Reads up to `count` frames from `fd` into consecutive `slot`-byte pieces of `pool` (at
    /// most [`MAX_BATCH`], and as many as fit), all submitted together, and stores each read's
    /// result (bytes read, or a negative errno: `-EAGAIN` once nothing is left) in `results`.
    /// The reads run in submission order, so frames fill the pieces in the order they came.
    /// Returns once the kernel is done with every read it took; an `Err` means the ring failed
    /// and must not be used again (reads without a result were not made: `-ECANCELED`).
    pub fn read_batch(
        &mut self,
        fd: RawFd,
        pool: &mut [u8],
        slot: usize,
        count: usize,
        results: &mut [i32],
    ) -> io::Result<()> {
        let count = count
            .min(MAX_BATCH)
            .min(results.len())
            .min(pool.len().checked_div(slot).unwrap_or(0));
        if count == 0 {
            return Ok(());
        }
        results[..count].fill(-libc::ECANCELED);
        {
            let mut sq = self.ring.submission();
            for (k, piece) in pool.chunks_exact_mut(slot).take(count).enumerate() {
                let entry =
                    opcode::Read::new(types::Fd(fd), piece.as_mut_ptr(), piece.len() as u32)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                        .user_data(k as u64);
                // SAFETY: the entry points to `piece`, exclusively borrowed (through `pool`)
                // for this call; `complete` returns only when the kernel has completed every
                // entry it took, and on an error the ring is dropped by the caller before
                // anything could submit the entries it did not take. The ring is empty here
                // and `count` is at most RING_ENTRIES.
                unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("io_uring full"))?;
            }
        }
        self.complete(count, results)
    }

    /// Submits the queued entries and reaps `count` completions into `results` (indexed by
    /// their user data).
    fn complete(&mut self, count: usize, results: &mut [i32]) -> io::Result<()> {
        let mut reaped = 0;
        let mut failures = 0u32;
        while reaped < count {
            let entered = self.ring.submit_and_wait(count - reaped);
            for cqe in self.ring.completion() {
                if let Some(slot) = results.get_mut(cqe.user_data() as usize) {
                    *slot = cqe.result();
                }
                reaped += 1;
            }
            let Err(e) = entered else { continue };
            failures += 1;
            let transient = matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
            );
            // Entries the kernel did not take are still in the submission queue; taken ones
            // not yet completed are in flight and still point into the caller's buffers.
            let untaken = self.ring.submission().len();
            let in_flight = count.saturating_sub(reaped + untaken);
            if in_flight == 0 && (!transient || failures > TRANSIENT_RETRIES) {
                return Err(e);
            }
            if failures > IN_FLIGHT_RETRIES {
                // The kernel keeps failing while it holds writes that point into memory we
                // are about to hand back: stopping is the only memory-safe way out.
                log::error!("io_uring_enter keeps failing ({e}) with writes in flight; aborting");
                std::process::abort();
            }
            std::thread::yield_now();
        }
        Ok(())
    }
}

/// What a thread's ring is.
enum ThreadRing {
    /// Not made yet.
    Untried,
    Ready(Box<BatchRing>),
    /// Could not be made (or failed): this thread writes without one.
    Unavailable,
}

thread_local! {
    static THREAD_RING: RefCell<ThreadRing> = const { RefCell::new(ThreadRing::Untried) };
}

/// Runs `f` with the calling thread's ring (made on the first call; `None` where io_uring is
/// unavailable). If `f` reports that the ring failed (returns `Err`), the ring is dropped and
/// the thread goes on without one. Returns `f`'s result, or `None` when there is no ring.
pub fn with_thread_ring<T>(f: impl FnOnce(&mut BatchRing) -> io::Result<T>) -> Option<T> {
    THREAD_RING.with(|cell| {
        let mut state = cell.borrow_mut();
        if matches!(*state, ThreadRing::Untried) {
            *state = match BatchRing::new() {
                Ok(ring) => ThreadRing::Ready(Box::new(ring)),
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}); one system call per frame");
                    ThreadRing::Unavailable
                }
            };
        }
        let ThreadRing::Ready(ring) = &mut *state else {
            return None;
        };
        match f(ring) {
            Ok(value) => Some(value),
            Err(e) => {
                log::warn!("io_uring failed ({e}); one system call per frame from now on");
                *state = ThreadRing::Unavailable;
                None
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A ring, or `None` (with a note) where this kernel has no io_uring.
    fn ring_or_skip() -> Option<BatchRing> {
        let ring = BatchRing::new();
        if let Err(e) = &ring {
            eprintln!("io_uring unavailable here ({e}): nothing to test");
        }
        ring.ok()
    }

    /// A non-blocking pipe (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", io::Error::last_os_error());
        // SAFETY: both descriptors were just made by pipe2 and are owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn a_batch_of_writes_arrives_whole_and_in_order() {
        let Some(mut ring) = ring_or_skip() else {
            return;
        };
        let (rx, tx) = pipe();
        let parts: Vec<Vec<u8>> = (0..150u8)
            .map(|i| vec![i; 1 + usize::from(i % 7)])
            .collect();
        // Two slices a write, 75 writes (more than one chunk of MAX_BATCH).
        let iovs: Vec<IoSlice> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let writes: Vec<Range<usize>> = (0..75).map(|w| 2 * w..2 * w + 2).collect();
        let mut results = vec![0; writes.len()];
        ring.writev_batch(tx.as_raw_fd(), &iovs, &writes, &mut results)
            .unwrap();
        for (w, r) in results.iter().enumerate() {
            assert_eq!(*r as usize, parts[2 * w].len() + parts[2 * w + 1].len());
        }
        let mut got = vec![0u8; 4096];
        // SAFETY: `got` is a valid writable buffer of its length.
        let n = unsafe { libc::read(rx.as_raw_fd(), got.as_mut_ptr().cast(), got.len()) };
        let want: Vec<u8> = parts.concat();
        assert_eq!(&got[..n as usize], &want[..]);
    }

    #[test]
    fn a_refused_write_gets_its_error_and_the_others_go_on() {
        let Some(mut ring) = ring_or_skip() else {
            return;
        };
        let (rx, tx) = pipe();
        drop(rx);
        let data = [1u8; 8];
        let iovs = [IoSlice::new(&data)];
        let mut results = [0; 3];
        // SIGPIPE would kill the test process: ignore it for this thread's writes.
        // SAFETY: setting SIGPIPE to ignored has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        ring.writev_batch(tx.as_raw_fd(), &iovs, &[0..1, 0..1, 0..1], &mut results)
            .unwrap();
        assert_eq!(results, [-libc::EPIPE; 3]);
        // A bad descriptor: each write fails on its own, the ring stays usable.
        let one = std::slice::from_ref(&(0..1));
        ring.writev_batch(-1, &iovs, one, &mut results).unwrap();
        assert_eq!(results[0], -libc::EBADF);
    }

    #[test]
    fn a_batch_of_reads_takes_what_is_there_in_order_and_then_eagain() {
        let Some(mut ring) = ring_or_skip() else {
            return;
        };
        // A datagram socket pair keeps message boundaries, like a TAP's queue.
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both descriptors were just made and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        for i in 0..5u8 {
            let msg = vec![i; 10 + usize::from(i)];
            // SAFETY: `msg` is valid readable memory of its length.
            let n = unsafe { libc::write(b.as_raw_fd(), msg.as_ptr().cast(), msg.len()) };
            assert_eq!(n as usize, msg.len());
        }
        let mut pool = vec![0u8; 8 * 64];
        let mut results = [0i32; 8];
        ring.read_batch(a.as_raw_fd(), &mut pool, 64, 8, &mut results)
            .unwrap();
        for i in 0..5 {
            assert_eq!(results[i], 10 + i as i32, "{results:?}");
            assert!(pool[i * 64..i * 64 + 10 + i].iter().all(|&x| x == i as u8));
        }
        assert!(
            results[5..].iter().all(|&r| r == -libc::EAGAIN),
            "{results:?}"
        );
        // More pieces asked for than the pool holds: only those that fit are read.
        results.fill(0);
        ring.read_batch(a.as_raw_fd(), &mut pool[..100], 64, 8, &mut results)
            .unwrap();
        assert_eq!(results[0], -libc::EAGAIN);
        assert_eq!(results[1], 0, "only one piece fits");
        // No room at all (or zero-sized pieces): nothing is read, nothing panics.
        ring.read_batch(a.as_raw_fd(), &mut pool, 0, 8, &mut results)
            .unwrap();
        ring.read_batch(a.as_raw_fd(), &mut pool[..10], 64, 8, &mut results)
            .unwrap();
    }

    #[test]
    fn a_full_pipe_answers_eagain_instead_of_waiting() {
        let Some(mut ring) = ring_or_skip() else {
            return;
        };
        let (_rx, tx) = pipe();
        let big = vec![7u8; 1 << 20];
        let iovs = [IoSlice::new(&big)];
        let mut results = [0; 4];
        ring.writev_batch(
            tx.as_raw_fd(),
            &iovs,
            &[0..1, 0..1, 0..1, 0..1],
            &mut results,
        )
        .unwrap();
        // The pipe takes at most its capacity (64 KiB by default), then says it is full.
        assert!(
            results[0] > 0 && (results[0] as usize) < big.len(),
            "{results:?}"
        );
        assert!(
            results[1..].iter().all(|&r| r == -libc::EAGAIN),
            "{results:?}"
        );
    }
}
