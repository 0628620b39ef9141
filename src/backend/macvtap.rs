//! The macvtap backend (as in the original usnetd): a macvtap in `passthru` mode takes every
//! frame of the NIC away from the kernel and hands it to its character device.
//!
//! API: [`MacvtapBackend`] (config + [`Backend`] impl), [`MacvtapRxQueue`],
//! [`MacvtapTxQueue`], [`MacvtapStats`].
//!
//! `open` creates `<nic>usnetdmvt` (with `ip link`), sets it up and opens its character device
//! once per queue through a private device node made from the major:minor in sysfs (the
//! `/dev/tap<ifindex>` names clash across network namespaces). Each open is one macvtap queue;
//! the kernel spreads flows over them. Fds are non-blocking and without vnet headers (the
//! kernel segments GSO frames for us; checksum offload is therefore not used). Receive reads
//! into a pool of [`MAX_BATCH`] buffers and lends them: several reads at once through the
//! worker thread's io_uring (`crate::host::uring`; as many as the last burst suggests, so an
//! idle queue costs one empty read, a busy one a system call per up to 64 frames), or one
//! `read` per frame without it; transmit writes one frame per `write`. Transmit queues share the receive queues' fds (an extra fd would be an
//! extra receive queue nobody reads). The macvtap is removed when the last queue is dropped.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use usnetd_shards::offload::{VnetHdr, VNET_HDR_LEN};
use usnetd_shards::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};

use super::sysutil::{
    cvt, if_nametoindex, invalid, last_error, run_command, with_private_sysfs, NetNs,
};
use super::{Backend, NicPorts};

/// Size of one receive buffer: a jumbo frame with VLAN tags fits.
pub const RX_BUFFER_SIZE: usize = 16 * 1024;
/// Receive buffer size with vnet headers: the header and a TCP super-segment of up to 64 KiB
/// with its Ethernet and VLAN headers.
pub const VNET_RX_BUFFER_SIZE: usize = VNET_HDR_LEN + 65535 + 14 + 8;

/// Configuration of the macvtap backend.
#[derive(Clone, Debug)]
pub struct MacvtapBackend {
    /// Number of macvtap queues (receive queues; 0 counts as 1).
    pub queues: usize,
    /// Opens the queues with `IFF_VNET_HDR` and checksum/TSO offloads: TCP super-segments
    /// (GRO on a NIC, TSO of a veth peer) and partial checksums arrive whole with their
    /// metadata instead of being cut (or checksummed) by the kernel first, and travel through
    /// the data plane that way (see `usnetd_shards::offload`). On by default.
    pub vnet_hdr: bool,
    /// Receive with one io_uring submission of several reads instead of one read(2) a frame,
    /// where the kernel allows it (see `crate::host::uring`). On by default.
    pub io_uring: bool,
}

impl Default for MacvtapBackend {
    fn default() -> Self {
        MacvtapBackend {
            queues: 1,
            vnet_hdr: true,
            io_uring: true,
        }
    }
}

/// The name of the macvtap made on `ifname`: `<ifname>usnetdmvt`, or `usnmvt<ifindex hex>`
/// where that is too long for an interface name.
pub fn macvtap_name(ifname: &str, ifindex: u32) -> String {
    let name = format!("{ifname}usnetdmvt");
    if name.len() < libc::IFNAMSIZ {
        name
    } else {
        format!("usnmvt{ifindex:x}")
    }
}

/// Deletes a macvtap that a crashed run left on `ifname`, if any; returns whether there was
/// one. The daemon calls this before it records the NIC's state, so that the removal (which
/// the kernel follows with address and route events on the lower device) happens before the
/// recording and not in the middle of the takeover.
pub fn remove_stale(ifname: &str) -> io::Result<bool> {
    let ifindex = if_nametoindex(ifname)?;
    let name = macvtap_name(ifname, ifindex);
    if if_nametoindex(&name).is_err() {
        return Ok(false);
    }
    log::warn!("repair: removing stale macvtap {name} on {ifname}");
    run_command(NetNs::current()?.command("ip").args(["link", "del", &name]))?;
    Ok(true)
}

/// The macvtap interface; deleted on drop (in the namespace it was made in).
struct MacvtapLink {
    ns: NetNs,
    name: String,
}

impl MacvtapLink {
    fn create(ns: NetNs, lower: &str, name: &str) -> io::Result<MacvtapLink> {
        let add = |ns: &NetNs| {
            run_command(ns.command("ip").args([
                "link", "add", "link", lower, "name", name, "type", "macvtap", "mode", "passthru",
            ]))
        };
        if let Err(e) = add(&ns) {
            // A macvtap left by a crashed run blocks ours (passthru allows one): replace it.
            if if_nametoindex(name).is_err() {
                return Err(e);
            }
            log::warn!("removing stale macvtap {name}");
            run_command(ns.command("ip").args(["link", "del", name]))?;
            add(&ns)?;
        }
        let link = MacvtapLink {
            ns,
            name: name.to_owned(),
        };
        run_command(link.ns.command("ip").args(["link", "set", name, "up"]))?;
        Ok(link)
    }
}

impl Drop for MacvtapLink {
    fn drop(&mut self) {
        if let Err(e) = run_command(self.ns.command("ip").args(["link", "del", &self.name])) {
            log::warn!("removing macvtap {}: {e}", self.name);
        }
    }
}

/// Reads `major:minor` of the macvtap's character device from sysfs.
fn read_dev_numbers(ns: &NetNs, name: &str) -> io::Result<(u32, u32)> {
    let text = with_private_sysfs(ns, |sys| {
        let dir = sys.join("class/net").join(name).join("macvtap");
        let entry = std::fs::read_dir(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?
            .filter_map(Result::ok)
            .find(|e| e.file_name().as_bytes().starts_with(b"tap"))
            .ok_or_else(|| invalid(format!("no tap device in {}", dir.display())))?;
        std::fs::read_to_string(entry.path().join("dev"))
    })?;
    let parse = |s: Option<&str>| s.and_then(|s| s.trim().parse::<u32>().ok());
    let mut parts = text.split(':');
    match (parse(parts.next()), parse(parts.next())) {
        (Some(major), Some(minor)) => Ok((major, minor)),
        _ => Err(invalid(format!("bad macvtap dev number {text:?}"))),
    }
}

/// Opens the character device `major:minor` `count` times through a private device node,
/// made in the temp dir (or in /dev where the temp dir does not allow devices).
fn open_char_device(major: u32, minor: u32, count: usize) -> io::Result<Vec<OwnedFd>> {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let leaf = format!(
        "usnetd-macvtap-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let mut last_err = None;
    for base in [std::env::temp_dir(), PathBuf::from("/dev")] {
        let dir = base.join(&leaf);
        match open_via_node(&dir, major, minor, count) {
            Ok(fds) => return Ok(fds),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| invalid("no directory for the device node".into())))
}

fn open_via_node(dir: &Path, major: u32, minor: u32, count: usize) -> io::Result<Vec<OwnedFd>> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {}: {e}", dir.display())))?;
    let node = dir.join("tap");
    let result = (|| {
        let cnode = CString::new(node.as_os_str().as_bytes())
            .map_err(|_| invalid(format!("bad path {}", node.display())))?;
        // SAFETY: valid NUL-terminated path; creates a device node in our private directory.
        cvt(
            unsafe {
                libc::mknod(
                    cnode.as_ptr(),
                    libc::S_IFCHR | 0o600,
                    libc::makedev(major, minor),
                )
            },
            "mknod",
        )?;
        (0..count)
            .map(|_| {
                // SAFETY: valid NUL-terminated path; the returned fd is owned below.
                let fd = unsafe {
                    libc::open(
                        cnode.as_ptr(),
                        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                    )
                };
                cvt(fd, &format!("open {}", node.display()))?;
                // SAFETY: `fd` was just opened and is owned by nobody else.
                Ok(unsafe { OwnedFd::from_raw_fd(fd) })
            })
            .collect::<io::Result<Vec<_>>>()
    })();
    let _ = std::fs::remove_file(&node);
    let _ = std::fs::remove_dir(dir);
    result
}

/// `struct ifreq` as far as TUNSETIFF reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Sets the queue's flags: TAP frames, no packet info, a vnet header if asked for.
fn set_tap_flags(fd: BorrowedFd<'_>, multi_queue: bool, vnet_hdr: bool) -> io::Result<()> {
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: flags as libc::c_short,
        _pad: [0; 22],
    };
    // SAFETY: `req` is a valid ifreq-sized buffer the kernel reads (and may write).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    cvt(ret, "ioctl(TUNSETIFF)").map(drop)
}

impl Backend for MacvtapBackend {
    fn name(&self) -> &'static str {
        "macvtap"
    }

    fn open(&self, ifname: &str, tx_queues: usize) -> io::Result<NicPorts> {
        let ifindex = if_nametoindex(ifname)?;
        let name = macvtap_name(ifname, ifindex);
        let link = Arc::new(MacvtapLink::create(NetNs::current()?, ifname, &name)?);
        let (major, minor) = read_dev_numbers(&link.ns, &name)?;
        let count = self.queues.max(1);
        let fds = open_char_device(major, minor, count)?
            .into_iter()
            .map(|fd| {
                set_tap_flags(fd.as_fd(), count > 1, self.vnet_hdr)?;
                if self.vnet_hdr {
                    let features = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
                    crate::host::tap::tun_set_offload(&fd, features).map_err(|e| {
                        io::Error::new(e.kind(), format!("TUNSETOFFLOAD on {name}: {e}"))
                    })?;
                }
                Ok(Arc::new(fd))
            })
            .collect::<io::Result<Vec<_>>>()?;
        let rx = fds
            .iter()
            .map(|fd| {
                let slot = if self.vnet_hdr {
                    VNET_RX_BUFFER_SIZE
                } else {
                    RX_BUFFER_SIZE
                };
                Box::new(MacvtapRxQueue {
                    fd: Arc::clone(fd),
                    // Zeroed by the allocator's fresh pages: only what frames touch is backed.
                    pool: vec![0; MAX_BATCH * slot].into_boxed_slice(),
                    slot,
                    vnet_hdr: self.vnet_hdr,
                    lens: [0; MAX_BATCH],
                    hdrs: [VnetHdr::PLAIN; MAX_BATCH],
                    stats: MacvtapStats::default(),
                    io_uring: self.io_uring,
                    burst: MIN_BURST,
                    _link: Arc::clone(&link),
                }) as Box<dyn RxQueue>
            })
            .collect();
        let tx = (0..tx_queues)
            .map(|i| {
                Box::new(MacvtapTxQueue {
                    fd: Arc::clone(&fds[i % fds.len()]),
                    vnet_hdr: self.vnet_hdr,
                    stats: MacvtapStats::default(),
                    _link: Arc::clone(&link),
                }) as Box<dyn TxQueue>
            })
            .collect();
        Ok(NicPorts {
            rx,
            tx,
            kernel_pass: None,
        })
    }
}

/// Counters of one macvtap queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MacvtapStats {
    /// Frames received (lent) or sent.
    pub frames: u64,
    /// Bytes of those frames.
    pub bytes: u64,
    /// Frames dropped: larger than a receive buffer, or refused by the kernel on send.
    pub dropped: u64,
    /// Unexpected read or write errors.
    pub errors: u64,
}

/// One macvtap queue's receive side.
pub struct MacvtapRxQueue {
    fd: Arc<OwnedFd>,
    /// `MAX_BATCH` buffers of `slot` bytes.
    pool: Box<[u8]>,
    slot: usize,
    /// Whether each read starts with a `virtio_net_hdr`.
    vnet_hdr: bool,
    /// Length of the frame in each buffer (0: none).
    lens: [usize; MAX_BATCH],
    hdrs: [VnetHdr; MAX_BATCH],
    stats: MacvtapStats,
    /// Whether reads are batched through the worker thread's io_uring.
    io_uring: bool,
    /// Reads to submit at once next time: twice the last burst when every read found a
    /// frame, one more than the frames found otherwise (at least [`MIN_BURST`]).
    burst: usize,
    _link: Arc<MacvtapLink>,
}

/// The fewest reads submitted through io_uring at once (one read goes without the ring).
const MIN_BURST: usize = 2;

impl MacvtapRxQueue {
    /// The queue's fd, to wait for frames with `poll`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// This queue's counters.
    pub fn stats(&self) -> MacvtapStats {
        self.stats
    }
}

impl RxQueue for MacvtapRxQueue {
    fn prepare_wait(&mut self) -> Option<i32> {
        Some(self.fd().as_raw_fd())
    }

    fn recv<'a>(&'a mut self, batch: &mut FrameBatch<'a>) -> usize {
        let room = MAX_BATCH - batch.len();
        let slot = self.slot;
        // Buffers read into so far; each holds a frame or nothing (`lens` 0).
        let mut used = 0;
        while used < room {
            let want = self.burst.min(room - used);
            if self.io_uring && want >= MIN_BURST {
                let mut results = [0i32; MAX_BATCH];
                let fd = self.fd.as_raw_fd();
                let pool = &mut self.pool[used * slot..];
                let read = crate::host::uring::with_thread_ring(|ring| {
                    ring.read_batch(fd, pool, slot, want, &mut results)
                });
                if read.is_some() {
                    let (got, more) = self.take_reads(used, &results[..want]);
                    used += want;
                    self.burst = if more {
                        (2 * want).min(MAX_BATCH)
                    } else {
                        (got + 1).clamp(MIN_BURST, MAX_BATCH)
                    };
                    if more {
                        continue;
                    }
                    break;
                }
                // No ring on this thread: read one by one from now on.
                self.io_uring = false;
            }
            let buf = &mut self.pool[used * slot..(used + 1) * slot];
            // SAFETY: `buf` is valid for writes of its length.
            let ret =
                unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let result = if ret < 0 {
                -io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            } else {
                ret as i32
            };
            if result == -libc::EINTR {
                continue;
            }
            let (_, more) = self.take_reads(used, &[result]);
            used += 1;
            if !more {
                break;
            }
        }
        let this: &'a Self = self;
        let skip = if this.vnet_hdr { VNET_HDR_LEN } else { 0 };
        let mut n = 0;
        for (i, &len) in this.lens[..used].iter().enumerate() {
            if len == 0 {
                continue;
            }
            let frame = &this.pool[i * slot + skip..i * slot + len];
            if this.vnet_hdr {
                batch.push_offloaded(frame, this.hdrs[i]);
            } else {
                batch.push(frame);
            }
            n += 1;
        }
        n
    }
}

impl MacvtapRxQueue {
    /// Takes the results of reads into the buffers from `first` on (bytes read, or a negative
    /// errno): records each frame's length (0 for none) and header, and counts. Returns the
    /// frames found and whether more may be waiting (every read found a frame).
    fn take_reads(&mut self, first: usize, results: &[i32]) -> (usize, bool) {
        let slot = self.slot;
        let mut got = 0;
        let mut more = true;
        for (k, &r) in results.iter().enumerate() {
            let i = first + k;
            self.lens[i] = 0;
            if r <= 0 {
                // 0: nothing; EAGAIN: the queue is empty; anything else is unexpected.
                if r < 0 && r != -libc::EAGAIN && r != -libc::EINTR {
                    self.stats.errors += 1;
                }
                more = false;
                continue;
            }
            let len = r as usize;
            // The kernel reports the full length of a frame it had to cut.
            if len > slot {
                self.stats.dropped += 1;
                continue;
            }
            if self.vnet_hdr {
                match VnetHdr::parse(&self.pool[i * slot..i * slot + len]) {
                    Some(hdr) => self.hdrs[i] = hdr,
                    None => {
                        // Shorter than its own header: nothing to forward.
                        self.stats.dropped += 1;
                        continue;
                    }
                }
            }
            self.lens[i] = len;
            self.stats.frames += 1;
            self.stats.bytes += len as u64;
            got += 1;
        }
        (got, more)
    }
}

/// One macvtap queue's transmit side.
pub struct MacvtapTxQueue {
    fd: Arc<OwnedFd>,
    /// Whether writes start with a (zero: nothing to offload) `virtio_net_hdr`.
    vnet_hdr: bool,
    stats: MacvtapStats,
    _link: Arc<MacvtapLink>,
}

impl MacvtapTxQueue {
    /// This queue's counters.
    pub fn stats(&self) -> MacvtapStats {
        self.stats
    }
}

impl TxQueue for MacvtapTxQueue {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.send_with(frames, None)
    }

    fn accepts_offloads(&self) -> bool {
        self.vnet_hdr
    }

    fn send_offloaded(&mut self, frames: &[&[u8]], offloads: &[VnetHdr]) -> usize {
        self.send_with(frames, Some(offloads))
    }
}

impl MacvtapTxQueue {
    /// Writes `frames` (after their vnet headers when the queue has them), as many as the
    /// kernel takes.
    fn send_with(&mut self, frames: &[&[u8]], offloads: Option<&[VnetHdr]>) -> usize {
        let mut done = 0;
        while done < frames.len() {
            let frame = frames[done];
            let hdr_bytes = offloads
                .and_then(|o| o.get(done))
                .copied()
                .unwrap_or(VnetHdr::PLAIN)
                .to_bytes();
            let hdr: &[u8] = if self.vnet_hdr { &hdr_bytes } else { &[] };
            let iov = [
                libc::iovec {
                    iov_base: hdr.as_ptr() as *mut libc::c_void,
                    iov_len: hdr.len(),
                },
                libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                },
            ];
            // SAFETY: both iovecs point to memory valid for reads of their lengths during the
            // call (the kernel only reads through them despite the `*mut`).
            let ret = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
            if ret < 0 {
                let err = last_error("write");
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN | libc::ENOBUFS) => break,
                    _ => {
                        // A bad frame (too large, too short): skip it, count it.
                        self.stats.dropped += 1;
                        done += 1;
                        continue;
                    }
                }
            }
            self.stats.frames += 1;
            self.stats.bytes += frame.len() as u64;
            done += 1;
        }
        done
    }
}
