//! The TAP device through which the host kernel reaches the switch.
//!
//! API: [`Tap::open`] creates (or attaches to) a TAP interface with `IFF_TAP | IFF_NO_PI`,
//! non-blocking, with one file descriptor per queue (`IFF_MULTI_QUEUE` when more than one).
//! [`Tap::sink`] gives the data plane an [`EndpointSink`] ([`TapSink`]: frames the switch
//! delivers to the kernel are written to the TAP, worker `w` using queue `w % queues`), and
//! [`Tap::rx_queues`] one [`RxQueue`] per queue ([`TapRxQueue`]: frames the kernel sends,
//! read into a fixed pool of buffers and lent to the caller).
//!
//! The TAP is not persistent: it disappears when the last of its file descriptors is closed
//! (the [`Tap`], its sink and its receive queues share them), also when the process is killed.
//! All `unsafe` of this module is in the four small syscall wrappers at the bottom.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue, MAX_BATCH};

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
}

/// An open TAP device: its name and one non-blocking file descriptor per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<Arc<OwnedFd>>,
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
            queues.push(Arc::new(fd));
        }
        Ok(Tap { name, queues })
    }

    /// The interface name the kernel gave the TAP.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The number of queues.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    /// The endpoint sink that writes frames for the kernel into the TAP.
    pub fn sink(&self) -> Arc<TapSink> {
        Arc::new(TapSink {
            queues: self.queues.clone(),
            refused: AtomicU64::new(0),
        })
    }

    /// One receive queue per TAP queue, each with [`MAX_BATCH`] buffers big enough for a
    /// frame of `mtu` bytes of payload (plus Ethernet and VLAN headers). Longer frames (only
    /// if the TAP's MTU is raised later) are dropped and counted in
    /// [`TapRxQueue::read_errors`].
    pub fn rx_queues(&self, mtu: usize) -> Vec<TapRxQueue> {
        self.queues
            .iter()
            .map(|fd| TapRxQueue::new(fd.clone(), mtu + FRAME_OVERHEAD))
            .collect()
    }
}

/// Delivers frames to the kernel by writing them into the TAP. Never blocks.
#[derive(Debug)]
pub struct TapSink {
    queues: Vec<Arc<OwnedFd>>,
    refused: AtomicU64,
}

impl TapSink {
    /// Frames the TAP refused (malformed or too large, or no memory), over its lifetime.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

impl EndpointSink for TapSink {
    fn deliver(&self, worker: usize, frames: &[&[u8]]) -> usize {
        let fd = self.queues[worker % self.queues.len()].as_raw_fd();
        let mut accepted = 0;
        for (i, frame) in frames.iter().enumerate() {
            match write_fd(fd, frame) {
                Ok(_) => accepted += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    // One retry; a second interruption counts as a refusal.
                    if write_fd(fd, frame).is_ok() {
                        accepted += 1;
                    } else {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Full: the rest of the batch would not fit either.
                    self.refused
                        .fetch_add((frames.len() - i) as u64, Ordering::Relaxed);
                    break;
                }
                Err(_) => {
                    // This frame is bad (EINVAL: too short or too long); the next may be fine.
                    self.refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        accepted
    }
}

/// Reads the frames the kernel sends through one TAP queue, into a fixed pool of
/// [`MAX_BATCH`] buffers, and lends them.
#[derive(Debug)]
pub struct TapRxQueue {
    fd: Arc<OwnedFd>,
    slot_size: usize,
    pool: Box<[u8]>,
    lens: [usize; MAX_BATCH],
    read_errors: u64,
}

impl TapRxQueue {
    fn new(fd: Arc<OwnedFd>, slot_size: usize) -> TapRxQueue {
        TapRxQueue {
            fd,
            slot_size,
            pool: vec![0u8; slot_size * MAX_BATCH].into_boxed_slice(),
            lens: [0; MAX_BATCH],
            read_errors: 0,
        }
    }

    /// Frames lost to read errors (a frame longer than a buffer), over this queue's lifetime.
    pub fn read_errors(&self) -> u64 {
        self.read_errors
    }
}

impl RxQueue for TapRxQueue {
    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let room = MAX_BATCH - batch.len();
        let fd = self.fd.as_raw_fd();
        let mut filled = 0;
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
        };
        assert_eq!(
            Tap::open(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        let none = TapConfig {
            name: "tapx".into(),
            queues: 0,
        };
        assert_eq!(
            Tap::open(&none).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
