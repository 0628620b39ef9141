//! Small safe wrappers over the Linux calls the AF_PACKET and macvtap backends need: errors
//! that name the failing call, socket options, an owned memory mapping, interface indexes,
//! network-namespace handles for helper commands, a private view of sysfs, and a tiny eBPF
//! program that keeps the kernel off a claimed NIC.
//!
//! API: [`cvt`], [`if_nametoindex`], [`setsockopt`], [`getsockopt_u32`], [`poll_readable`],
//! [`Mmap`], [`NetNs`], [`run_command`], [`with_private_sysfs`], [`nic_rx_queue_count`],
//! [`KernelIngressBlock`].

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::ptr::NonNull;

/// Turns a `-1` return of a libc call into an error that names `what` (the call).
pub fn cvt(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(last_error(what))
    } else {
        Ok(ret)
    }
}

/// The thread's last OS error, prefixed with `what`.
pub fn last_error(what: &str) -> io::Error {
    let err = io::Error::last_os_error();
    io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// An error of kind `InvalidInput` with a message.
pub fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The index of interface `name` in the calling thread's network namespace.
pub fn if_nametoindex(name: &str) -> io::Result<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(invalid(format!("bad interface name {name:?}")));
    }
    let cname = CString::new(name).map_err(|_| invalid(format!("bad interface name {name:?}")))?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        Err(last_error(&format!("if_nametoindex({name})")))
    } else {
        Ok(index)
    }
}

/// Creates a socket; the returned fd is close-on-exec.
pub fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall without pointers.
    let fd = cvt(
        unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) },
        "socket",
    )?;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets socket option `name` at `level` to the plain-data value `value`.
pub fn setsockopt<T: Copy>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `value` points to `size_of::<T>()` readable bytes for the duration of the call;
    // `T: Copy` restricts it to plain data the kernel only reads.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    };
    cvt(ret, what).map(drop)
}

/// Reads an integer socket option.
pub fn getsockopt_u32(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    what: &str,
) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the size of `value`.
    let ret = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut u32).cast(),
            &mut len,
        )
    };
    cvt(ret, what)?;
    Ok(value)
}

/// Waits up to `timeout_ms` (-1: forever) until `fd` is readable. Returns whether it is.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    match cvt(n, "poll") {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// A shared memory mapping of a file descriptor (a packet ring), unmapped on drop.
pub struct Mmap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; moving it to another thread is
// fine. Concurrent access with the kernel is synchronized by the ring protocol of its user.
unsafe impl Send for Mmap {}

impl Mmap {
    /// Maps `len` bytes of `fd` read/write and shared.
    pub fn new(fd: BorrowedFd<'_>, len: usize) -> io::Result<Mmap> {
        // SAFETY: a fresh mapping chosen by the kernel; nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_LOCKED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        let ptr = if ptr == libc::MAP_FAILED {
            // MAP_LOCKED fails without enough RLIMIT_MEMLOCK: retry without it.
            // SAFETY: as above.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(last_error("mmap"));
            }
            ptr
        } else {
            ptr
        };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| last_error("mmap"))?;
        Ok(Mmap { ptr, len })
    }

    /// The start of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never: mmap refuses empty mappings).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value owns; no borrow of it outlives
        // `self` (users hand out slices borrowed from themselves only).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// A handle on a network namespace (the calling thread's, when made by [`NetNs::current`]),
/// used to run helper commands there later, from any thread.
pub struct NetNs(OwnedFd);

impl NetNs {
    /// The calling thread's network namespace.
    pub fn current() -> io::Result<NetNs> {
        let file = File::open("/proc/thread-self/ns/net")
            .map_err(|e| io::Error::new(e.kind(), format!("open /proc/thread-self/ns/net: {e}")))?;
        Ok(NetNs(file.into()))
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own.
        cvt(
            unsafe { libc::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET) },
            "setns",
        )
        .map(drop)
    }

    /// A command that runs in this namespace (whatever thread spawns it).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        let fd: RawFd = self.0.as_raw_fd();
        // SAFETY: the hook only calls setns(2), a plain syscall that is async-signal-safe, on
        // an fd that stays open (owned by `self`, which the caller keeps for the spawn).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// Runs `cmd` to completion; an error (with its stderr) when it fails.
pub fn run_command(cmd: &mut Command) -> io::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `f` with the path of a sysfs that shows the network devices of `ns`.
///
/// sysfs shows the devices of the namespace that mounted it, not of the calling thread, so a
/// thread that entered another namespace with `setns` reads the wrong `/sys/class/net`. This
/// runs `f` on a helper thread that enters `ns`, unshares its mount namespace (made private,
/// so nothing propagates back) and mounts a fresh sysfs on `/sys`; all of that disappears with
/// the thread. Where that is not permitted, `f` gets the plain `/sys`.
pub fn with_private_sysfs<R: Send>(
    ns: &NetNs,
    f: impl FnOnce(&Path) -> io::Result<R> + Send,
) -> io::Result<R> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter()?;
                if mount_private_sysfs().is_err() {
                    log::debug!("no private sysfs; reading the process's /sys");
                }
                f(Path::new("/sys"))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("sysfs helper thread panicked")))
    })
}

/// Gives the calling thread its own private mount namespace with a sysfs of its current
/// network namespace on `/sys`.
fn mount_private_sysfs() -> io::Result<()> {
    // SAFETY: plain syscall; CLONE_NEWNS (with the implied CLONE_FS) only affects this thread.
    cvt(unsafe { libc::unshare(libc::CLONE_NEWNS) }, "unshare")?;
    let root = c"/";
    let sys = c"/sys";
    let sysfs = c"sysfs";
    // SAFETY: valid NUL-terminated strings; this makes all mounts of this thread's new mount
    // namespace private so the sysfs mount below cannot propagate to other namespaces.
    cvt(
        unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        },
        "mount MS_PRIVATE",
    )?;
    // SAFETY: valid NUL-terminated strings; mounts only in this thread's private namespace.
    cvt(
        unsafe {
            libc::mount(
                sysfs.as_ptr(),
                sys.as_ptr(),
                sysfs.as_ptr(),
                0,
                std::ptr::null(),
            )
        },
        "mount sysfs",
    )
    .map(drop)
}

/// The number of receive queues of `ifname` (in the calling thread's namespace), or 1 when
/// sysfs cannot tell.
pub fn nic_rx_queue_count(ifname: &str) -> usize {
    let Ok(ns) = NetNs::current() else { return 1 };
    let count = with_private_sysfs(&ns, |sys| {
        let dir = sys.join("class/net").join(ifname).join("queues");
        Ok(std::fs::read_dir(dir)?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
            .count())
    });
    count.unwrap_or(1).max(1)
}

/// Keeps the kernel's network stack from receiving any frame of one interface while it lives,
/// without hiding the frames from packet sockets (which see them before the ingress hook).
///
/// Prefers a tcx ingress eBPF link (two instructions: `r0 = TCX_DROP; exit`): it detaches when
/// its fd closes, so even a crashed daemon leaves the NIC usable. Kernels without tcx (before
/// 6.6) get a `clsact` qdisc with a classic-BPF direct-action drop filter through `tc`, removed
/// on drop.
pub struct KernelIngressBlock {
    inner: IngressBlockKind,
}

enum IngressBlockKind {
    Tcx {
        _link: OwnedFd,
    },
    Tc {
        ns: NetNs,
        ifname: String,
        created_qdisc: bool,
    },
}

/// Preference of our tc filter (an unlikely value, so that we remove only ours).
const TC_FILTER_PREF: &str = "29949";

impl KernelIngressBlock {
    /// Starts dropping all frames of `ifname` (index `ifindex`) at the kernel's ingress.
    pub fn install(ifname: &str, ifindex: u32) -> io::Result<KernelIngressBlock> {
        match attach_tcx_drop(ifindex) {
            Ok(link) => Ok(KernelIngressBlock {
                inner: IngressBlockKind::Tcx { _link: link },
            }),
            Err(tcx_err) => {
                log::info!("tcx ingress drop unavailable ({tcx_err}); using tc clsact");
                Self::install_tc(ifname).map_err(|e| {
                    io::Error::new(e.kind(), format!("{e} (after tcx failed: {tcx_err})"))
                })
            }
        }
    }

    fn install_tc(ifname: &str) -> io::Result<KernelIngressBlock> {
        let ns = NetNs::current()?;
        let created_qdisc = run_command(
            ns.command("tc")
                .args(["qdisc", "add", "dev", ifname, "clsact"]),
        )
        .is_ok();
        let block = KernelIngressBlock {
            inner: IngressBlockKind::Tc {
                ns,
                ifname: ifname.to_owned(),
                created_qdisc,
            },
        };
        if let IngressBlockKind::Tc { ns, .. } = &block.inner {
            // cBPF `ret #2` = TC_ACT_SHOT in direct-action mode: no action module needed.
            run_command(ns.command("tc").args([
                "filter",
                "add",
                "dev",
                ifname,
                "ingress",
                "pref",
                TC_FILTER_PREF,
                "bpf",
                "da",
                "bytecode",
                "1,6 0 0 2,",
            ]))?;
        }
        Ok(block)
    }

    /// Whether the block uses a tcx link (else a tc filter).
    pub fn is_tcx(&self) -> bool {
        matches!(self.inner, IngressBlockKind::Tcx { .. })
    }
}

impl Drop for KernelIngressBlock {
    fn drop(&mut self) {
        if let IngressBlockKind::Tc {
            ns,
            ifname,
            created_qdisc,
        } = &self.inner
        {
            let res = if *created_qdisc {
                run_command(
                    ns.command("tc")
                        .args(["qdisc", "del", "dev", ifname, "clsact"]),
                )
            } else {
                run_command(ns.command("tc").args([
                    "filter",
                    "del",
                    "dev",
                    ifname,
                    "ingress",
                    "pref",
                    TC_FILTER_PREF,
                ]))
            };
            if let Err(e) = res {
                log::warn!("removing the ingress drop filter of {ifname}: {e}");
            }
        }
        // The tcx link detaches when its fd closes.
    }
}

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// The prefix of `union bpf_attr` used by BPF_PROG_LOAD, padded to a size the kernel accepts.
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _pad: [u64; 8],
}

/// The prefix of `union bpf_attr` used by BPF_LINK_CREATE for tcx.
#[repr(C)]
#[derive(Clone, Copy)]
struct BpfLinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad0: u32,
    expected_revision: u64,
    _pad: [u64; 4],
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T, what: &str) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, zero-padded bpf_attr prefix of `size_of::<T>()` bytes; the
    // kernel reads it (and for these commands writes nothing back into it).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *mut T).cast::<libc::c_void>(),
            mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(last_error(what));
    }
    // SAFETY: a new fd returned by bpf(2), owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// Loads `r0 = 2 (TCX_DROP); exit` and links it to the tcx ingress of `ifindex`.
fn attach_tcx_drop(ifindex: u32) -> io::Result<OwnedFd> {
    // mov64 r0, 2 ; exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..11].copy_from_slice(b"usnetd_drop");
    let mut load = BpfProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: BPF_TCX_INGRESS,
        _pad: [0; 8],
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load, "bpf(BPF_PROG_LOAD)")?;
    let mut link = BpfLinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        flags: 0,
        relative_fd: 0,
        _pad0: 0,
        expected_revision: 0,
        _pad: [0; 4],
    };
    bpf(
        BPF_LINK_CREATE,
        &mut link,
        "bpf(BPF_LINK_CREATE tcx ingress)",
    )
}

/// `ETHTOOL_GTXCSUM`: whether transmit checksumming is on.
pub const ETHTOOL_GTXCSUM: u32 = 0x16;
/// `ETHTOOL_GTSO`: whether TCP segmentation offload is on.
pub const ETHTOOL_GTSO: u32 = 0x1e;

/// One `struct ethtool_value` query (`cmd` is an `ETHTOOL_G*` command) of `ifname`, through
/// the socket `fd` (any socket of the interface's network namespace).
pub fn ethtool_value(fd: BorrowedFd<'_>, ifname: &str, cmd: u32) -> io::Result<u32> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfreqData {
        name: [libc::c_char; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    if ifname.is_empty() || ifname.len() >= libc::IFNAMSIZ || ifname.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let mut value = EthtoolValue { cmd, data: 0 };
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL reads the ifreq (NUL-terminated name: at most IFNAMSIZ-1 bytes were
    // written, data pointer) and writes through `data` into `value`, a live `struct
    // ethtool_value`; both outlive the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCETHTOOL, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}
