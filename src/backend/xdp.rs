//! The AF_XDP backend: claims a NIC with an XDP program that steers every frame of receive
//! queue `q` to an AF_XDP socket bound to queue `q`.
//!
//! API: [`XdpBackend`] (a [`Backend`]), whose ports are [`XdpRxQueue`] and [`XdpTxQueue`];
//! [`open_tx_only`] opens transmit queues without claiming the NIC (for traffic generators).
//!
//! Layout and choices:
//! - One AF_XDP socket per NIC receive queue (the count comes from `ETHTOOL_GCHANNELS`, or
//!   `/sys/class/net/IF/queues/rx-*` where the driver has no channel info), each with its
//!   **own UMEM**. A UMEM is cut in two: the first `rx_ring_size` frames belong to the
//!   receive half (fill ring + rx ring), the rest to the transmit half (tx ring + completion
//!   ring). The halves share only the socket fd and the mapping; they never touch each
//!   other's frames or rings, so an [`XdpRxQueue`] and an [`XdpTxQueue`] of the same socket
//!   can run on different threads without any lock. A UMEM shared between queues would need
//!   a lock around its frame pool; separate UMEMs cost only memory (6 MiB per queue with the
//!   defaults).
//! - Bind flags: `XDP_USE_NEED_WAKEUP`, and neither `XDP_ZEROCOPY` nor `XDP_COPY`, which makes
//!   the kernel try zero-copy first and fall back to copy mode (veth: always copy mode);
//!   [`XdpConfig::zero_copy`] `false` forces copy mode. The mode in use is read back with
//!   `XDP_OPTIONS`.
//! - The program is attached in native (driver) mode through a bpf_link; only if the driver
//!   has no native XDP (`EOPNOTSUPP`) it falls back to generic mode, with a warning. The link,
//!   program and map live as long as any queue of the NIC: dropping all ports detaches XDP
//!   and gives the NIC back to the kernel. So does the process's exit.
//! - Transmit queues: the kernel allows one UMEM pool per queue id, so a second socket on the
//!   same queue must share the first socket's UMEM *and* its fill/completion rings
//!   (`XDP_SHARED_UMEM`), which then need a lock anyway. So the first `n` transmit queues
//!   (n = number of sockets) are the sockets' transmit halves, lock-free; when more are asked
//!   for, transmit queue `i` uses socket `i % n`, and the halves used more than once are put
//!   behind a `Mutex` (taken once per batch).
//! - Oversized frames given to [`XdpTxQueue::send`] are counted ([`TxStats::too_long`]) and
//!   skipped, so one bad frame does not drop the rest of its batch.
//! - `send` kicks the kernel with `sendto` while the tx ring asks for it (copy mode sends a
//!   bounded number of frames per call). If the kernel is busy (`EAGAIN`), the frames stay
//!   in the tx ring and go out with the next `send`'s kick.
//! - Closing a socket frees its queue asynchronously in the kernel; `bind` retries `EBUSY`
//!   for about a second so that a NIC can be claimed again right after being released.

use std::ffi::CString;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use usnetd_shards::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};

use super::bpf::{
    Fallback, SteeringProgram, XdpLink, XskMap, XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE,
};
use super::kernel_pass::{KernelPass, DEFAULT_MAX_RULES};
use super::{Backend, NicPorts};

/// Sizes and modes of the AF_XDP sockets.
#[derive(Clone, Debug)]
pub struct XdpConfig {
    /// Entries of each socket's rx and fill rings, and its number of receive frames. A power
    /// of two.
    pub rx_ring_size: u32,
    /// Entries of each socket's tx and completion rings, and its number of transmit frames. A
    /// power of two.
    pub tx_ring_size: u32,
    /// Size of a UMEM frame (2048 or 4096): the largest frame received or sent.
    pub frame_size: u32,
    /// Let the kernel try zero-copy first (`true`), or force copy mode.
    pub zero_copy: bool,
    /// Put the kernel's fast path in front of the sockets (`backend::kernel_pass`): the
    /// returned [`NicPorts::kernel_pass`] holds its map, which starts empty.
    pub kernel_pass: bool,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            rx_ring_size: 2048,
            tx_ring_size: 1024,
            frame_size: 2048,
            zero_copy: true,
            kernel_pass: false,
        }
    }
}

impl XdpConfig {
    fn validate(&self) -> io::Result<()> {
        let pow2 = |v: u32| v.is_power_of_two();
        if !pow2(self.rx_ring_size) || !pow2(self.tx_ring_size) || self.rx_ring_size < 64 {
            return Err(invalid(
                "AF_XDP ring sizes must be powers of two, at least 64",
            ));
        }
        if self.frame_size != 2048 && self.frame_size != 4096 {
            return Err(invalid("AF_XDP frame size must be 2048 or 4096"));
        }
        Ok(())
    }

    fn umem_frames(&self) -> u64 {
        u64::from(self.rx_ring_size) + u64::from(self.tx_ring_size)
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.to_string())
}

/// Adds the failing call's name to the last OS error.
fn os_error(what: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// The AF_XDP backend (`BACKEND=xdp`).
#[derive(Clone, Debug, Default)]
pub struct XdpBackend {
    config: XdpConfig,
}

impl XdpBackend {
    /// A backend with the given socket sizes and modes.
    pub fn new(config: XdpConfig) -> Self {
        XdpBackend { config }
    }
}

impl Backend for XdpBackend {
    fn name(&self) -> &'static str {
        "xdp"
    }

    fn open(&self, ifname: &str, tx_queues: usize) -> io::Result<NicPorts> {
        self.config.validate()?;
        let ifindex = ifindex(ifname)?;
        let queues = rx_queue_count(ifname)?;
        let map = XskMap::create(queues)?;
        let fast_path = match self.config.kernel_pass.then(|| load_with_kernel_pass(&map)) {
            Some(Err(e)) => {
                log::warn!(
                    "{ifname}: no kernel fast path ({e}); every frame takes the switch's path"
                );
                None
            }
            other => other.and_then(Result::ok),
        };
        let (program, kernel_pass) = match fast_path {
            Some((program, kp)) => (program, Some(Arc::new(kp))),
            None => (SteeringProgram::load(&map, Fallback::Drop)?, None),
        };
        let mut sockets = Vec::with_capacity(queues as usize);
        for queue in 0..queues {
            let socket = XskSocket::open(ifindex, queue, &self.config)
                .map_err(|e| io::Error::new(e.kind(), format!("{ifname} queue {queue}: {e}")))?;
            map.insert(queue, &socket)?;
            sockets.push(socket);
        }
        // Sockets are in the map before the program runs: no frame ever hits a missing socket.
        let link = match program.attach(ifindex, XDP_FLAGS_DRV_MODE) {
            Ok(link) => link,
            Err(err) if err.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                log::warn!("{ifname}: no native XDP ({err}); using generic XDP");
                program.attach(ifindex, XDP_FLAGS_SKB_MODE)?
            }
            Err(err) => return Err(io::Error::new(err.kind(), format!("{ifname}: {err}"))),
        };
        let zero_copy = sockets.iter().filter(|s| s.zero_copy).count();
        log::info!(
            "{ifname}: claimed with AF_XDP, {queues} queues ({zero_copy} zero-copy), \
             {tx_queues} tx queues, kernel fast path {}",
            if kernel_pass.is_some() { "on" } else { "off" }
        );
        let claim = Arc::new(Claim {
            _link: link,
            _program: program,
            _map: map,
        });
        let mut rx: Vec<Box<dyn RxQueue>> = Vec::with_capacity(sockets.len());
        let mut tx_halves = Vec::with_capacity(sockets.len());
        for socket in sockets {
            let (rx_half, tx_half) = socket.split(Some(Arc::clone(&claim)));
            rx.push(Box::new(rx_half));
            tx_halves.push(tx_half);
        }
        Ok(NicPorts {
            rx,
            tx: spread_tx(tx_halves, tx_queues),
            kernel_pass,
        })
    }
}

/// The kernel fast path's maps and the steering program that uses them.
fn load_with_kernel_pass(map: &XskMap) -> io::Result<(SteeringProgram, KernelPass)> {
    let kp = KernelPass::create(DEFAULT_MAX_RULES)?;
    let program = SteeringProgram::load_with_kernel_pass(
        map,
        Fallback::Drop,
        &kp.map4,
        &kp.map6,
        &kp.counters,
    )?;
    Ok((program, kp))
}

/// Opens one transmit-only AF_XDP socket on each of `queues` of `ifname` (in the calling
/// thread's network namespace) **without** attaching any XDP program: the kernel keeps
/// receiving the NIC's frames. For traffic generators (`usnetd-bench gen --io xdp`). The
/// sockets' receive halves are dropped (without a program nothing is steered to them).
pub fn open_tx_only(
    ifname: &str,
    queues: &[u32],
    config: &XdpConfig,
) -> io::Result<Vec<XdpTxQueue>> {
    config.validate()?;
    let ifindex = ifindex(ifname)?;
    queues
        .iter()
        .map(|&queue| {
            let socket = XskSocket::open(ifindex, queue, config)
                .map_err(|e| io::Error::new(e.kind(), format!("{ifname} queue {queue}: {e}")))?;
            Ok(socket.split(None).1)
        })
        .collect()
}

/// Hands out `count` transmit queues over the sockets' transmit halves (see the module docs).
fn spread_tx(halves: Vec<XdpTxQueue>, count: usize) -> Vec<Box<dyn TxQueue>> {
    let n = halves.len();
    if n == 0 {
        return Vec::new();
    }
    let mut out: Vec<Box<dyn TxQueue>> = Vec::with_capacity(count);
    if count <= n {
        for half in halves.into_iter().take(count) {
            out.push(Box::new(half));
        }
        return out;
    }
    let shared: Vec<Arc<Mutex<XdpTxQueue>>> = halves
        .into_iter()
        .map(|h| Arc::new(Mutex::new(h)))
        .collect();
    for i in 0..count {
        out.push(Box::new(SharedTxQueue(Arc::clone(&shared[i % n]))));
    }
    out
}

/// What keeps a NIC claimed: the attached program and its map. Dropped with the last queue.
struct Claim {
    /// Dropped first: detaches the program.
    _link: XdpLink,
    _program: SteeringProgram,
    _map: XskMap,
}

/// The interface index of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(|_| invalid("interface name contains NUL"))?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        let err = io::Error::last_os_error();
        let kind = match err.raw_os_error() {
            Some(libc::ENODEV) => io::ErrorKind::NotFound,
            _ => err.kind(),
        };
        return Err(io::Error::new(kind, format!("interface {ifname}: {err}")));
    }
    Ok(index)
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_channels`.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// `struct ifreq` with the `ifr_data` member.
#[repr(C)]
struct IfreqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// The number of receive queues of `ifname` (in the calling thread's network namespace):
/// `ETHTOOL_GCHANNELS` (combined + rx-only channels); where the driver does not say, the
/// `rx-*` entries in sysfs (which show the namespace sysfs was mounted in); else 1.
pub fn rx_queue_count(ifname: &str) -> io::Result<u32> {
    if ifname.len() >= libc::IFNAMSIZ || ifname.is_empty() || ifname.contains('\0') {
        return Err(invalid("bad interface name"));
    }
    let mut channels = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..Default::default()
    };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: &mut channels as *mut EthtoolChannels as *mut libc::c_void,
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket creation; the fd is owned right below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(os_error("socket(AF_INET) for ethtool"));
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCETHTOOL reads the ifreq (NUL-terminated name, data pointer) and writes
    // through `data` into `channels`, a live `struct ethtool_channels`.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if ret == 0 {
        let count = channels.combined_count + channels.rx_count;
        if count > 0 {
            return Ok(count);
        }
    } else {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODEV) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("interface {ifname}: {err}"),
            ));
        }
    }
    let dir = format!("/sys/class/net/{ifname}/queues");
    let count = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
                .count() as u32
        })
        .unwrap_or(0);
    Ok(count.max(1))
}

/// A memory mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a mapping is plain memory; who may read or write which bytes is decided by the
// types holding it (ring ownership, frame ownership), not by the thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared references only hand out raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// `mmap(2)` of `len` bytes; `fd` `None` maps private anonymous memory.
    fn new(len: usize, fd: Option<(RawFd, libc::off_t)>, what: &str) -> io::Result<Mapping> {
        let (flags, fd, offset) = match fd {
            Some((fd, offset)) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd, offset),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            ),
        };
        // SAFETY: a fresh mapping at an address the kernel picks; it aliases no Rust object.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error(what));
        }
        let ptr = NonNull::new(ptr as *mut u8).ok_or_else(|| os_error(what))?;
        Ok(Mapping { ptr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the region mapped in `new`, which nothing uses any more (the
        // owners of pointers into it hold the mapping and are being dropped).
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
    }
}

/// One of the four AF_XDP rings, mapped from the socket. `T` is `u64` (fill, completion) or
/// `xdp_desc` (rx, tx). We are the producer of fill and tx, the consumer of rx and completion.
struct Ring<T> {
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    mask: u32,
    size: u32,
    /// Our copy of the index we own, and the last seen value of the other side's.
    cached_prod: u32,
    cached_cons: u32,
    _map: Mapping,
}

// SAFETY: a ring is used by one thread at a time (it is moved, not shared, between threads:
// all methods take `&mut self`); the kernel is the only other party and synchronises through
// the atomic producer/consumer indices.
unsafe impl<T> Send for Ring<T> {}

impl<T: Copy> Ring<T> {
    /// Maps the ring of `size` entries at page offset `pgoff` of socket `fd`.
    fn map(
        fd: RawFd,
        off: &libc::xdp_ring_offset,
        size: u32,
        pgoff: libc::off_t,
        what: &str,
    ) -> io::Result<Ring<T>> {
        let len = off.desc as usize + size as usize * size_of::<T>();
        let map = Mapping::new(len, Some((fd, pgoff)), what)?;
        let base = map.ptr.as_ptr();
        let in_map = |o: u64, n: usize| (o as usize).checked_add(n).is_some_and(|e| e <= len);
        if !in_map(off.producer, 4) || !in_map(off.consumer, 4) || !in_map(off.flags, 4) {
            return Err(io::Error::other(format!(
                "{what}: ring offsets out of range"
            )));
        }
        // SAFETY: the offsets were checked to lie inside the mapping; the kernel places u32
        // indices and the descriptor array there, suitably aligned.
        let at = |o: u64| unsafe { NonNull::new_unchecked(base.add(o as usize)) };
        let producer = at(off.producer).cast::<AtomicU32>();
        let consumer = at(off.consumer).cast::<AtomicU32>();
        // SAFETY: as above, both pointers are inside the live mapping.
        let (prod, cons) = unsafe {
            (
                producer.as_ref().load(Ordering::Acquire),
                consumer.as_ref().load(Ordering::Acquire),
            )
        };
        Ok(Ring {
            producer,
            consumer,
            flags: at(off.flags).cast(),
            descs: at(off.desc).cast(),
            mask: size - 1,
            size,
            cached_prod: prod,
            cached_cons: cons,
            _map: map,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into `_map`, which lives as long as `self`; the kernel only accesses
        // it atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as in `producer`.
        unsafe { self.consumer.as_ref() }
    }

    /// Whether the kernel asks to be woken up (`XDP_RING_NEED_WAKEUP`).
    fn needs_wakeup(&self) -> bool {
        // SAFETY: as in `producer`.
        let flags = unsafe { self.flags.as_ref() };
        flags.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    // Producer side.

    /// Free entries we may produce into. Reads the kernel's consumer index every time (one
    /// load per batch): a cached value would under-report the room after the kernel caught
    /// up, and frames would be refused while the ring is nearly empty.
    fn free_entries(&mut self) -> u32 {
        self.cached_cons = self.consumer().load(Ordering::Acquire);
        self.size - self.cached_prod.wrapping_sub(self.cached_cons)
    }

    /// Writes entry `i` after the produced ones (not yet visible to the kernel).
    fn write(&mut self, i: u32, value: T) {
        let slot = (self.cached_prod.wrapping_add(i) & self.mask) as usize;
        // SAFETY: `slot < size`: inside the descriptor array of the mapping. The caller only
        // writes entries counted by `free_entries`, which the kernel does not read until
        // `submit` publishes them.
        unsafe { self.descs.as_ptr().add(slot).write_volatile(value) };
    }

    /// Publishes `n` written entries.
    fn submit(&mut self, n: u32) {
        self.cached_prod = self.cached_prod.wrapping_add(n);
        self.producer().store(self.cached_prod, Ordering::Release);
    }

    /// Entries produced but not yet consumed by the kernel.
    fn outstanding(&self) -> u32 {
        self.cached_prod
            .wrapping_sub(self.consumer().load(Ordering::Acquire))
    }

    // Consumer side.

    /// Entries ready to be consumed.
    fn available(&mut self) -> u32 {
        if self.cached_prod == self.cached_cons {
            self.cached_prod = self.producer().load(Ordering::Acquire);
        }
        self.cached_prod
            .wrapping_sub(self.cached_cons)
            .min(self.size)
    }

    /// Reads ready entry `i` (below `available()`).
    fn read(&self, i: u32) -> T {
        let slot = (self.cached_cons.wrapping_add(i) & self.mask) as usize;
        // SAFETY: `slot < size`: inside the descriptor array; the kernel published this
        // entry (Acquire load of the producer index) and does not reuse it before `release`.
        unsafe { self.descs.as_ptr().add(slot).read_volatile() }
    }

    /// Gives `n` consumed entries back to the kernel.
    fn release(&mut self, n: u32) {
        self.cached_cons = self.cached_cons.wrapping_add(n);
        self.consumer().store(self.cached_cons, Ordering::Release);
    }
}

fn setsockopt<T>(fd: RawFd, name: libc::c_int, value: &T, what: &str) -> io::Result<()> {
    // SAFETY: `value` is a live `T` of the size passed, as the option `name` expects.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_XDP,
            name,
            value as *const T as *const libc::c_void,
            size_of::<T>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(os_error(what));
    }
    Ok(())
}

/// Reads the XDP socket option `name` into a `T`, requiring the kernel to fill all of it.
fn getsockopt<T: Copy>(fd: RawFd, name: libc::c_int, what: &str) -> io::Result<T> {
    let mut value = MaybeUninit::<T>::zeroed();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, which has room for them.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            name,
            value.as_mut_ptr() as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(os_error(what));
    }
    if len as usize != size_of::<T>() {
        return Err(io::Error::other(format!(
            "{what}: kernel returned {len} bytes"
        )));
    }
    // SAFETY: zero-initialised, then fully written by the kernel (checked length); `T` is a
    // plain C struct of integers, valid for any bytes.
    Ok(unsafe { value.assume_init() })
}

/// How often, and how far apart, a bind refused with `EBUSY` is tried (about 1 s in all).
const BIND_BUSY_TRIES: u32 = 100;
const BIND_BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

/// The parts of a socket that both halves use.
struct XskShared {
    /// Closed before the UMEM is unmapped.
    fd: OwnedFd,
    umem: Mapping,
    /// Keeps the NIC claimed while any half lives.
    _claim: Option<Arc<Claim>>,
}

/// A bound AF_XDP socket with its UMEM and its four rings, before it is split into a receive
/// and a transmit half.
pub(crate) struct XskSocket {
    fd: OwnedFd,
    umem: Mapping,
    fill: Ring<u64>,
    completion: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    zero_copy: bool,
    queue: u32,
    config: XdpConfig,
}

impl AsRawFd for XskSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl XskSocket {
    /// Creates an AF_XDP socket with its own UMEM, fills the fill ring with all receive frames
    /// and binds it to queue `queue` of interface `ifindex`.
    pub(crate) fn open(ifindex: u32, queue: u32, config: &XdpConfig) -> io::Result<XskSocket> {
        config.validate()?;
        // SAFETY: plain socket creation; the fd is owned right below.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(os_error("socket(AF_XDP)"));
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let frame_size = u64::from(config.frame_size);
        let umem_len = config.umem_frames() * frame_size;
        let umem = Mapping::new(umem_len as usize, None, "mmap(UMEM)")?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem_len,
            chunk_size: config.frame_size,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        let raw = fd.as_raw_fd();
        setsockopt(raw, libc::XDP_UMEM_REG, &reg, "setsockopt(XDP_UMEM_REG)")?;
        let (rx_size, tx_size) = (config.rx_ring_size, config.tx_ring_size);
        setsockopt(
            raw,
            libc::XDP_UMEM_FILL_RING,
            &rx_size,
            "setsockopt(XDP_UMEM_FILL_RING)",
        )?;
        setsockopt(
            raw,
            libc::XDP_UMEM_COMPLETION_RING,
            &tx_size,
            "setsockopt(XDP_UMEM_COMPLETION_RING)",
        )?;
        setsockopt(raw, libc::XDP_RX_RING, &rx_size, "setsockopt(XDP_RX_RING)")?;
        setsockopt(raw, libc::XDP_TX_RING, &tx_size, "setsockopt(XDP_TX_RING)")?;
        let off: libc::xdp_mmap_offsets =
            getsockopt(raw, libc::XDP_MMAP_OFFSETS, "getsockopt(XDP_MMAP_OFFSETS)")?;
        let mut fill = Ring::<u64>::map(
            raw,
            &off.fr,
            rx_size,
            libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
            "mmap(fill ring)",
        )?;
        let completion = Ring::<u64>::map(
            raw,
            &off.cr,
            tx_size,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
            "mmap(completion ring)",
        )?;
        let rx = Ring::map(
            raw,
            &off.rx,
            rx_size,
            libc::XDP_PGOFF_RX_RING,
            "mmap(rx ring)",
        )?;
        let tx = Ring::map(
            raw,
            &off.tx,
            tx_size,
            libc::XDP_PGOFF_TX_RING,
            "mmap(tx ring)",
        )?;

        // All receive frames start in the fill ring.
        for i in 0..rx_size {
            fill.write(i, u64::from(i) * frame_size);
        }
        fill.submit(rx_size);

        let mut flags = libc::XDP_USE_NEED_WAKEUP;
        if !config.zero_copy {
            flags |= libc::XDP_COPY;
        }
        let addr = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: flags,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // A socket closed a moment ago (the previous claim of this NIC) releases its queue
        // asynchronously: `EBUSY` is retried for a bounded time before it counts.
        let mut tries = 0;
        loop {
            // SAFETY: `addr` is a valid sockaddr_xdp of the length passed.
            let ret = unsafe {
                libc::bind(
                    raw,
                    &addr as *const libc::sockaddr_xdp as *const libc::sockaddr,
                    size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
                )
            };
            if ret == 0 {
                break;
            }
            let err = os_error("bind(AF_XDP)");
            tries += 1;
            if err.kind() != io::ErrorKind::ResourceBusy || tries >= BIND_BUSY_TRIES {
                return Err(err);
            }
            std::thread::sleep(BIND_BUSY_WAIT);
        }
        let options: libc::xdp_options =
            getsockopt(raw, libc::XDP_OPTIONS, "getsockopt(XDP_OPTIONS)")?;
        Ok(XskSocket {
            fd,
            umem,
            fill,
            completion,
            rx,
            tx,
            zero_copy: options.flags & libc::XDP_OPTIONS_ZEROCOPY != 0,
            queue,
            config: config.clone(),
        })
    }

    /// Splits the socket into its receive and transmit halves.
    fn split(self, claim: Option<Arc<Claim>>) -> (XdpRxQueue, XdpTxQueue) {
        let frame_size = u64::from(self.config.frame_size);
        let rx_frames = u64::from(self.config.rx_ring_size);
        let tx_frames = u64::from(self.config.tx_ring_size);
        let shared = Arc::new(XskShared {
            fd: self.fd,
            umem: self.umem,
            _claim: claim,
        });
        let rx = XdpRxQueue {
            fill: self.fill,
            rx: self.rx,
            lent: [0; MAX_BATCH],
            lent_len: 0,
            frame_size,
            rx_end: rx_frames * frame_size,
            queue: self.queue,
            stats: RxStats::default(),
            ring_drops_seen: 0,
            shared: Arc::clone(&shared),
        };
        let free = (0..tx_frames)
            .map(|i| (rx_frames + i) * frame_size)
            .collect();
        let tx = XdpTxQueue {
            tx: self.tx,
            completion: self.completion,
            free,
            frame_size,
            tx_start: rx_frames * frame_size,
            tx_end: (rx_frames + tx_frames) * frame_size,
            queue: self.queue,
            stats: TxStats::default(),
            shared,
        };
        (rx, tx)
    }
}

/// The kernel's counters of one AF_XDP socket (`XDP_STATISTICS`).
pub type KernelStats = libc::xdp_statistics;

fn kernel_stats(fd: RawFd) -> io::Result<KernelStats> {
    getsockopt(fd, libc::XDP_STATISTICS, "getsockopt(XDP_STATISTICS)")
}

/// Counters of one receive queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStats {
    /// Frames lent out by `recv`.
    pub frames: u64,
    /// Descriptors pointing outside the receive frames (a kernel bug): skipped.
    pub bad_descriptors: u64,
    /// `recvfrom` calls made because the fill ring asked for a wakeup.
    pub wakeups: u64,
}

/// The receive half of one AF_XDP socket: one NIC receive queue.
pub struct XdpRxQueue {
    fill: Ring<u64>,
    rx: Ring<libc::xdp_desc>,
    /// Frames lent by the last `recv`, given back to the fill ring by the next.
    lent: [u64; MAX_BATCH],
    lent_len: usize,
    frame_size: u64,
    /// Receive frames are the UMEM's `0..rx_end`.
    rx_end: u64,
    queue: u32,
    stats: RxStats,
    /// The kernel's drop counters (rx dropped + rx ring full) at the last
    /// `take_ring_drops`: they only grow.
    ring_drops_seen: u64,
    shared: Arc<XskShared>,
}

impl XdpRxQueue {
    /// The NIC receive queue this socket is bound to.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// This queue's counters.
    pub fn stats(&self) -> RxStats {
        self.stats
    }

    /// The kernel's counters for the socket (drops for a full rx ring or an empty fill ring).
    pub fn kernel_stats(&self) -> io::Result<KernelStats> {
        kernel_stats(self.shared.fd.as_raw_fd())
    }

    /// Puts the frames lent by the last `recv` back into the fill ring.
    fn give_back(&mut self) {
        if self.lent_len == 0 {
            return;
        }
        // The fill ring has an entry for every receive frame, so this never runs short; if
        // it ever did, the rest stays lent until the next call.
        let n = (self.fill.free_entries() as usize).min(self.lent_len);
        for i in 0..n {
            self.fill.write(i as u32, self.lent[i]);
        }
        self.fill.submit(n as u32);
        self.lent.copy_within(n..self.lent_len, 0);
        self.lent_len -= n;
    }

    fn wake_if_needed(&mut self) {
        if self.fill.needs_wakeup() {
            self.stats.wakeups += 1;
            // SAFETY: a zero-length, non-blocking recvfrom with no buffers: it only makes the
            // kernel process the fill ring.
            unsafe {
                libc::recvfrom(
                    self.shared.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
    }
}

impl RxQueue for XdpRxQueue {
    fn take_ring_drops(&mut self) -> u64 {
        let Ok(st) = self.kernel_stats() else {
            return 0;
        };
        let total = st.rx_dropped + st.rx_ring_full;
        let new = total.saturating_sub(self.ring_drops_seen);
        self.ring_drops_seen = total;
        new
    }

    fn prepare_wait(&mut self) -> Option<i32> {
        // poll(2) on an AF_XDP socket reports POLLIN while its rx ring holds frames (and
        // kicks the kernel when the fill ring asked for a wake-up).
        Some(self.shared.fd.as_raw_fd())
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        self.give_back();
        let room = (MAX_BATCH - batch.len()).min(MAX_BATCH - self.lent_len);
        let ready = self.rx.available().min(room as u32);
        if ready == 0 {
            self.wake_if_needed();
            return 0;
        }
        let base = self.shared.umem.ptr.as_ptr();
        let mut pushed = 0;
        for i in 0..ready {
            let desc = self.rx.read(i);
            let chunk = desc.addr & !(self.frame_size - 1);
            let end = desc.addr.checked_add(u64::from(desc.len));
            if chunk >= self.rx_end || end.is_none_or(|e| e > chunk + self.frame_size) {
                self.stats.bad_descriptors += 1;
                continue;
            }
            // SAFETY: `addr..addr+len` lies inside one receive frame of the UMEM (checked
            // above), which `self.shared` keeps mapped for at least `'a` (self is borrowed
            // for `'a`). The kernel wrote the frame before publishing the descriptor and does
            // not touch it again until it is back in the fill ring, which happens only in the
            // next `recv`, after `'a` ends; the transmit half never touches receive frames.
            let frame = unsafe {
                std::slice::from_raw_parts(base.add(desc.addr as usize), desc.len as usize)
            };
            self.lent[self.lent_len] = chunk;
            self.lent_len += 1;
            if batch.push(frame) {
                pushed += 1;
            }
        }
        self.rx.release(ready);
        self.stats.frames += pushed as u64;
        pushed
    }
}

/// Counters of one transmit queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    /// Frames posted to the tx ring.
    pub frames: u64,
    /// Frames longer than a UMEM frame: skipped (counted as accepted by `send`).
    pub too_long: u64,
    /// `sendto` kicks.
    pub kicks: u64,
    /// Kicks that failed with something other than "busy, try again".
    pub kick_errors: u64,
    /// Completions pointing outside the transmit frames (a kernel bug): skipped.
    pub bad_completions: u64,
}

/// The transmit half of one AF_XDP socket.
pub struct XdpTxQueue {
    tx: Ring<libc::xdp_desc>,
    completion: Ring<u64>,
    /// Transmit frames not in the tx or completion ring (capacity = all transmit frames).
    free: Vec<u64>,
    frame_size: u64,
    /// Transmit frames are the UMEM's `tx_start..tx_end`.
    tx_start: u64,
    tx_end: u64,
    queue: u32,
    stats: TxStats,
    shared: Arc<XskShared>,
}

impl XdpTxQueue {
    /// The NIC queue this socket is bound to.
    pub fn queue(&self) -> u32 {
        self.queue
    }

    /// This queue's counters.
    pub fn stats(&self) -> TxStats {
        self.stats
    }

    /// The kernel's counters for the socket.
    pub fn kernel_stats(&self) -> io::Result<KernelStats> {
        kernel_stats(self.shared.fd.as_raw_fd())
    }

    /// Frames posted to the tx ring that the kernel has not taken yet (they go out with a
    /// later `send` or `flush`).
    pub fn pending(&self) -> u32 {
        self.tx.outstanding()
    }

    /// Takes the frames the kernel has sent back into the free list.
    fn reap(&mut self) {
        let done = self.completion.available();
        for i in 0..done {
            let addr = self.completion.read(i) & !(self.frame_size - 1);
            if addr < self.tx_start
                || addr >= self.tx_end
                || self.free.len() == self.free.capacity()
            {
                self.stats.bad_completions += 1;
                continue;
            }
            self.free.push(addr);
        }
        self.completion.release(done);
    }

    /// Makes the kernel transmit what is in the tx ring (copy mode sends a bounded number of
    /// frames per call, so this loops a few times while it makes progress).
    fn kick(&mut self) {
        for _ in 0..8 {
            if self.tx.outstanding() == 0 || !self.tx.needs_wakeup() {
                return;
            }
            self.stats.kicks += 1;
            // SAFETY: a zero-length, non-blocking sendto with no buffers or address: it only
            // makes the kernel process the tx ring.
            let ret = unsafe {
                libc::sendto(
                    self.shared.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if ret < 0 {
                let errno = io::Error::last_os_error().raw_os_error();
                if !matches!(errno, Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS)) {
                    self.stats.kick_errors += 1;
                }
                return;
            }
        }
    }
}

impl TxQueue for XdpTxQueue {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.reap();
        let mut accepted = 0;
        let mut posted = 0u32;
        let room = self.tx.free_entries();
        let base = self.shared.umem.ptr.as_ptr();
        for frame in frames {
            if frame.len() as u64 > self.frame_size {
                self.stats.too_long += 1;
                accepted += 1;
                continue;
            }
            if posted == room {
                break;
            }
            let Some(addr) = self.free.pop() else {
                break;
            };
            // SAFETY: `addr` is a free transmit frame (not in any ring, so neither the kernel
            // nor the receive half reads or writes it), `frame_size` bytes inside the UMEM,
            // which `self.shared` keeps mapped; `frame` fits (checked above) and is a separate
            // Rust slice, so the regions do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(frame.as_ptr(), base.add(addr as usize), frame.len())
            };
            self.tx.write(
                posted,
                libc::xdp_desc {
                    addr,
                    len: frame.len() as u32,
                    options: 0,
                },
            );
            posted += 1;
            accepted += 1;
        }
        if posted > 0 {
            self.tx.submit(posted);
            self.stats.frames += u64::from(posted);
        }
        self.kick();
        accepted
    }

    fn flush(&mut self) {
        // Two loads when nothing waits; a kick (and a reap of completions) when frames are
        // still in the tx ring because the kernel was busy at the last `send`.
        if self.tx.outstanding() != 0 {
            self.reap();
            self.kick();
        }
    }
}

/// A transmit half used by several transmit queues (more asked for than the NIC has).
struct SharedTxQueue(Arc<Mutex<XdpTxQueue>>);

impl TxQueue for SharedTxQueue {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        // A panic while holding the lock cannot leave the rings inconsistent with the
        // kernel in a way worse than lost frames: keep using it.
        let mut queue = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        queue.send(frames)
    }

    fn flush(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(XdpConfig::default().validate().is_ok());
        let bad_ring = XdpConfig {
            rx_ring_size: 1000,
            ..XdpConfig::default()
        };
        assert!(bad_ring.validate().is_err());
        let bad_frame = XdpConfig {
            frame_size: 3000,
            ..XdpConfig::default()
        };
        assert!(bad_frame.validate().is_err());
    }

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(size_of::<EthtoolChannels>(), 36);
        assert_eq!(size_of::<IfreqData>(), 40);
        assert_eq!(size_of::<libc::xdp_desc>(), 16);
    }

    /// The kernel keeps one UMEM pool per queue id: a second socket with its own UMEM on the
    /// same queue is refused (why extra transmit queues share a socket's half, see the module
    /// docs).
    #[test]
    fn one_socket_per_queue() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: AF_XDP needs root");
            return;
        }
        let result = std::thread::spawn(|| -> io::Result<(io::Result<()>, bool)> {
            // SAFETY: unshare affects only this fresh thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(os_error("unshare"));
            }
            let config = XdpConfig {
                rx_ring_size: 64,
                tx_ring_size: 64,
                ..XdpConfig::default()
            };
            let lo = ifindex("lo")?;
            // The kernel frees a closed socket's queue asynchronously: reopening right away
            // works through the bind retry.
            drop(XskSocket::open(lo, 0, &config)?);
            let first = XskSocket::open(lo, 0, &config)?;
            let second = XskSocket::open(lo, 0, &config).map(|_| ());
            // A queue the device does not have (lo has one) is refused too, as bad input.
            let other = XskSocket::open(lo, 1, &config).map(|_| ());
            assert!(other.is_err_and(|e| e.kind() == io::ErrorKind::InvalidInput));
            Ok((second, first.zero_copy))
        })
        .join()
        .expect("test thread panicked");
        let (second, zero_copy) = result.expect("AF_XDP on loopback");
        let err = second.expect_err("two UMEMs on one queue");
        assert_eq!(err.raw_os_error(), None, "context is added: {err}");
        assert!(err.to_string().contains("bind(AF_XDP)"), "{err}");
        assert!(!zero_copy, "loopback has no zero-copy AF_XDP");
    }

    /// Transmit-only sockets attach no program; what they send leaves through the device and
    /// the tx ring drains.
    #[test]
    fn transmit_only_sockets_send() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: AF_XDP needs root");
            return;
        }
        let stats = std::thread::spawn(|| -> io::Result<TxStats> {
            // SAFETY: unshare affects only this fresh thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(os_error("unshare"));
            }
            let config = XdpConfig {
                rx_ring_size: 64,
                tx_ring_size: 64,
                ..XdpConfig::default()
            };
            assert!(open_tx_only("no-such-if", &[0], &config).is_err());
            // A child forked from this thread starts in its namespace.
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()?;
            assert!(up.success(), "ip link set lo up");
            let mut queues = open_tx_only("lo", &[0], &config)?;
            assert_eq!(queues.len(), 1);
            let q = &mut queues[0];
            let frame = [0u8; 60];
            assert_eq!(q.send(&[&frame, &frame, &frame]), 3);
            for _ in 0..1000 {
                if q.pending() == 0 {
                    break;
                }
                q.flush();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            assert_eq!(q.pending(), 0, "the kernel took every frame");
            Ok(q.stats())
        })
        .join()
        .expect("test thread panicked")
        .expect("AF_XDP on loopback");
        assert_eq!(stats.frames, 3);
        assert_eq!(stats.too_long, 0);
    }

    #[test]
    fn bad_interface_names_are_refused() {
        assert!(rx_queue_count("").is_err());
        assert!(rx_queue_count("a-name-much-too-long").is_err());
        assert!(ifindex("bad\0name").is_err());
    }
}
