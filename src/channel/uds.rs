//! The Unix-datagram packet channel of the `RequestUDS` protocol: a
//! `socketpair(AF_UNIX, SOCK_DGRAM)` carrying exactly one raw Ethernet frame per datagram.
//!
//! - [`UdsChannel::pair`] creates the pair: the client's end is handed over by SCM_RIGHTS, the
//!   switch keeps the other, non-blocking, with large socket buffers.
//! - [`UdsSink`] (an [`EndpointSink`]) sends a delivered batch with one `sendmmsg`; several
//!   workers may deliver at once (the kernel serialises on the socket).
//! - [`UdsSource`] (an [`RxQueue`]) receives up to a batch with one `recvmmsg` into a fixed
//!   pool of buffers and lends them.
//!
//! Frames above the NIC's MTU + 14 are never delivered (the client reads with a buffer of that
//! size and would truncate them) and are counted; datagrams from the client above that size
//! are dropped and counted too.
//!
//! A dead peer: on a datagram socketpair the kernel signals nothing on poll when the other end
//! closes; the next send fails with ECONNREFUSED (then ENOTCONN). The sink marks the channel
//! closed then, and [`UdsSource::is_closed`] / [`UdsSink::is_closed`] report it. A client that
//! is never sent anything is noticed by the control side (its pid), not here: any probe that
//! could tell would deliver a datagram to a live client.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue, MAX_BATCH};

/// Bytes of the Ethernet header the MTU does not count.
pub const ETHERNET_HEADER: usize = 14;

/// The socket buffer size asked for on both ends (the kernel doubles it; without root it is
/// capped at `net.core.wmem_max` / `rmem_max`).
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Counters of one Unix-datagram channel (switch side).
#[derive(Debug, Default)]
pub struct UdsStats {
    /// Frames not delivered because they exceed MTU + 14 (or are empty).
    pub oversize_out: AtomicU64,
    /// Frames refused because the socket buffer was full.
    pub full_out: AtomicU64,
    /// Datagrams from the client dropped because they exceed MTU + 14 (or are empty).
    pub oversize_in: AtomicU64,
    /// Unexpected send or receive errors (other than full / peer gone).
    pub errors: AtomicU64,
}

struct Shared {
    fd: OwnedFd,
    max_frame: usize,
    closed: AtomicBool,
    stats: UdsStats,
}

impl Shared {
    fn note_send_error(&self, e: &io::Error) {
        match e.raw_os_error() {
            Some(libc::ECONNREFUSED) | Some(libc::ENOTCONN) | Some(libc::EPIPE) => {
                self.closed.store(true, Ordering::Relaxed)
            }
            _ => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Creates Unix-datagram channels.
pub struct UdsChannel;

impl UdsChannel {
    /// Creates a socketpair for an endpoint on a NIC with `mtu`. Returns the client's end (to
    /// send by SCM_RIGHTS; blocking, close-on-exec) and the switch's sink and source.
    pub fn pair(mtu: usize) -> io::Result<(OwnedFd, UdsSink, UdsSource)> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two fds into the array on success.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds are fresh and owned by nobody else.
        let (client, switch) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        set_buffers(client.as_fd());
        let (sink, source) = Self::from_switch_end(switch, mtu)?;
        Ok((client, sink, source))
    }

    /// Wraps an existing switch-side datagram socket (connected to its client, e.g. a static
    /// socket): makes it non-blocking and enlarges its buffers.
    pub fn from_switch_end(fd: OwnedFd, mtu: usize) -> io::Result<(UdsSink, UdsSource)> {
        // SAFETY: F_GETFL/F_SETFL on an fd we own.
        unsafe {
            let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        set_buffers(fd.as_fd());
        let max_frame = mtu.saturating_add(ETHERNET_HEADER).max(ETHERNET_HEADER);
        let shared = Arc::new(Shared {
            fd,
            max_frame,
            closed: AtomicBool::new(false),
            stats: UdsStats::default(),
        });
        let source = UdsSource {
            shared: shared.clone(),
            pool: vec![0u8; max_frame * MAX_BATCH].into_boxed_slice(),
        };
        Ok((UdsSink { shared }, source))
    }
}

/// Asks for large send and receive buffers: the forcing variants first (root), then the
/// plain ones (capped by the sysctls). Failure only means smaller buffers.
fn set_buffers(fd: BorrowedFd<'_>) {
    let size = SOCKET_BUFFER as libc::c_int;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: setsockopt reads one c_int from a live local.
            let r = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

/// The switch's sending side of a Unix-datagram channel.
pub struct UdsSink {
    shared: Arc<Shared>,
}

impl UdsSink {
    /// Whether the client's end is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// The channel's counters.
    pub fn stats(&self) -> &UdsStats {
        &self.shared.stats
    }

    /// The largest frame delivered (MTU + 14).
    pub fn max_frame(&self) -> usize {
        self.shared.max_frame
    }
}

impl EndpointSink for UdsSink {
    fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
        if self.is_closed() {
            return 0;
        }
        let mut delivered = 0;
        for chunk in frames.chunks(MAX_BATCH) {
            let sent = send_batch(&self.shared, chunk);
            delivered += sent.sent;
            if sent.stopped {
                break;
            }
        }
        delivered
    }
}

struct SendResult {
    sent: usize,
    stopped: bool,
}

/// Sends up to [`MAX_BATCH`] frames with one `sendmmsg`, skipping oversize ones.
fn send_batch(shared: &Shared, frames: &[&[u8]]) -> SendResult {
    // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
    let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
    let mut n = 0;
    for f in frames.iter().take(MAX_BATCH) {
        if f.is_empty() || f.len() > shared.max_frame {
            shared.stats.oversize_out.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        iov[n] = libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        };
        n += 1;
    }
    if n == 0 {
        return SendResult {
            sent: 0,
            stopped: false,
        };
    }
    for i in 0..n {
        msgs[i].msg_hdr.msg_iov = &mut iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: `msgs[..n]` point at `iov[..n]`, which point at the borrowed frames; all live
    // for the duration of the call, and the kernel only reads them.
    let r = unsafe {
        libc::sendmmsg(
            shared.fd.as_raw_fd(),
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {
                shared.stats.full_out.fetch_add(n as u64, Ordering::Relaxed);
            }
            _ => shared.note_send_error(&e),
        }
        return SendResult {
            sent: 0,
            stopped: true,
        };
    }
    let sent = r as usize;
    if sent < n {
        shared
            .stats
            .full_out
            .fetch_add((n - sent) as u64, Ordering::Relaxed);
    }
    SendResult {
        sent,
        stopped: sent < n,
    }
}

/// The switch's receiving side of a Unix-datagram channel.
pub struct UdsSource {
    shared: Arc<Shared>,
    pool: Box<[u8]>,
}

impl UdsSource {
    /// Whether the client's end is known to be closed (learned by the sink's sends).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// The channel's counters.
    pub fn stats(&self) -> &UdsStats {
        &self.shared.stats
    }

    /// The switch's socket, to poll for readability.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.shared.fd.as_fd()
    }
}

impl RxQueue for UdsSource {
    fn prepare_wait(&mut self) -> Option<i32> {
        Some(self.fd().as_raw_fd())
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let want = MAX_BATCH - batch.len();
        if want == 0 {
            return 0;
        }
        let buf = self.shared.max_frame;
        // SAFETY: iovec and mmsghdr are plain C structs for which all-zero is valid.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { std::mem::zeroed() };
        let base = self.pool.as_mut_ptr();
        for i in 0..want {
            iov[i] = libc::iovec {
                // The pool holds MAX_BATCH buffers of `buf` bytes; `i < MAX_BATCH`.
                iov_base: base.wrapping_add(i * buf).cast(),
                iov_len: buf,
            };
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each of `msgs[..want]` points at one iovec covering a disjoint `buf`-byte
        // part of `self.pool`, which we borrow mutably for the call; the kernel writes at most
        // `buf` bytes into each.
        let r = unsafe {
            libc::recvmmsg(
                self.shared.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                want as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
            }
            return 0;
        }
        let received = r as usize;
        let mut lens = [0usize; MAX_BATCH];
        for (i, m) in msgs.iter().take(received).enumerate() {
            let len = m.msg_len as usize;
            if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len == 0 || len > buf {
                self.shared
                    .stats
                    .oversize_in
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            lens[i] = len;
        }
        let pool: &'a [u8] = &self.pool;
        let mut pushed = 0;
        for (i, &len) in lens.iter().take(received).enumerate() {
            if len > 0 && batch.push(&pool[i * buf..i * buf + len]) {
                pushed += 1;
            }
        }
        pushed
    }
}
