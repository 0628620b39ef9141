//! The XDP steering program and the bpf(2) calls around it, without clang or libbpf.
//!
//! API:
//! - [`XskMap`]: a `BPF_MAP_TYPE_XSKMAP` (receive queue index -> AF_XDP socket), created with
//!   `BPF_MAP_CREATE`; [`XskMap::insert`] / [`XskMap::remove`].
//! - [`SteeringProgram`]: the XDP program, loaded with `BPF_PROG_LOAD` (the verifier log goes
//!   into the error); [`SteeringProgram::test_run`] runs it on one frame with
//!   `BPF_PROG_TEST_RUN`.
//! - [`XdpLink`]: the program attached to an interface with `BPF_LINK_CREATE`; the kernel
//!   detaches it when the link's fd is closed (drop, or process exit), so a crashed daemon never
//!   leaves the NIC black-holed.
//!
//! The program, as BPF assembly:
//!
//! ```text
//! r2 = *(u32 *)(r1 + 16)        ; ctx->rx_queue_index
//! r1 = map_fd ll                ; the XSKMAP
//! r3 = FALLBACK                 ; flags: low bits = action when the map has no socket
//! call bpf_redirect_map         ; XDP_REDIRECT to the queue's socket, else FALLBACK
//! exit
//! ```
//!
//! The fallback for a queue without a socket is [`Fallback::Drop`] in the daemon: a claimed
//! NIC's frames must reach the kernel only through the switch (which firewalls it), never
//! around it, including while sockets are being set up or torn down.
//! [`Fallback::Pass`] exists for tests and tools.

use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// `enum bpf_cmd` values used here (`linux/bpf.h`).
const BPF_MAP_CREATE: libc::c_int = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TEST_RUN: libc::c_int = 10;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`: `BPF_XDP`.
const BPF_XDP: u32 = 37;
/// `BPF_FUNC_redirect_map`.
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
/// `src_reg` of a 64-bit immediate load that holds a map fd.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `offsetof(struct xdp_md, rx_queue_index)`.
const XDP_MD_RX_QUEUE_INDEX: i16 = 16;

/// `XDP_FLAGS_SKB_MODE`: generic XDP, works on every interface, after the skb is built.
pub const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`: native XDP in the driver.
pub const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// XDP actions (`enum xdp_action`).
pub mod action {
    /// `XDP_ABORTED`.
    pub const ABORTED: u32 = 0;
    /// `XDP_DROP`.
    pub const DROP: u32 = 1;
    /// `XDP_PASS`.
    pub const PASS: u32 = 2;
    /// `XDP_TX`.
    pub const TX: u32 = 3;
    /// `XDP_REDIRECT`.
    pub const REDIRECT: u32 = 4;
}

/// What the steering program does with a frame whose receive queue has no socket in the map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Drop it (the daemon's choice: the kernel sees a claimed NIC only through the switch).
    Drop,
    /// Give it to the kernel's stack.
    Pass,
}

impl Fallback {
    fn action(self) -> u32 {
        match self {
            Fallback::Drop => action::DROP,
            Fallback::Pass => action::PASS,
        }
    }
}

/// One BPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Insn {
    code: u8,
    /// `dst_reg` in the low nibble, `src_reg` in the high nibble.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (src << 4) | (dst & 0x0f),
            off,
            imm,
        }
    }
}

/// Opcodes (`linux/bpf_common.h`, `linux/bpf.h`).
mod op {
    /// `BPF_LDX (0x01) | BPF_MEM (0x60) | BPF_W (0x00)`.
    pub const LDX_MEM_W: u8 = 0x61;
    /// `BPF_LD (0x00) | BPF_IMM (0x00) | BPF_DW (0x18)` (takes two instruction slots).
    pub const LD_IMM_DW: u8 = 0x18;
    /// `BPF_ALU64 (0x07) | BPF_MOV (0xb0) | BPF_K (0x00)`.
    pub const MOV64_IMM: u8 = 0xb7;
    /// `BPF_JMP | BPF_CALL`.
    pub const CALL: u8 = 0x05 | 0x80;
    /// `BPF_JMP | BPF_EXIT`.
    pub const EXIT: u8 = 0x05 | 0x90;
}

/// The steering program's instructions for an XSKMAP with fd `map_fd`.
fn steering_insns(map_fd: RawFd, fallback: Fallback) -> [Insn; 6] {
    [
        Insn::new(op::LDX_MEM_W, 2, 1, XDP_MD_RX_QUEUE_INDEX, 0),
        Insn::new(op::LD_IMM_DW, 1, BPF_PSEUDO_MAP_FD, 0, map_fd),
        Insn::new(0, 0, 0, 0, 0),
        Insn::new(op::MOV64_IMM, 3, 0, 0, fallback.action() as i32),
        Insn::new(op::CALL, 0, 0, 0, BPF_FUNC_REDIRECT_MAP),
        Insn::new(op::EXIT, 0, 0, 0, 0),
    ]
}

/// Calls bpf(2) with `attr`; returns the syscall's non-negative result.
///
/// # Safety
/// `attr` must be the `union bpf_attr` member that `cmd` expects, and every pointer in it must
/// be valid for the access the kernel makes for `cmd` during the call.
unsafe fn sys_bpf<A>(cmd: libc::c_int, attr: &mut A, what: &str) -> io::Result<libc::c_long> {
    // SAFETY: the caller guarantees `attr` matches `cmd`; the size passed is the struct's own,
    // which the kernel copies (and zero-extends to its full `union bpf_attr`).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut A as *mut libc::c_void,
            size_of::<A>() as libc::c_uint,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("bpf({what}): {err}")));
    }
    Ok(ret)
}

/// Like [`sys_bpf`] for commands that return a new fd.
///
/// # Safety
/// As [`sys_bpf`].
unsafe fn sys_bpf_fd<A>(cmd: libc::c_int, attr: &mut A, what: &str) -> io::Result<OwnedFd> {
    // SAFETY: forwarded from the caller.
    let fd = unsafe { sys_bpf(cmd, attr, what)? };
    // SAFETY: on success these commands return a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn object_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().zip(
        name.bytes()
            .filter(|b| b.is_ascii_alphanumeric() || *b == b'_')
            .take(15),
    ) {
        *o = b;
    }
    out
}

/// `bpf_attr` for `BPF_MAP_CREATE`.
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `bpf_attr` for `BPF_MAP_*_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `bpf_attr` for `BPF_PROG_LOAD`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
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
}

/// `bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `bpf_attr` for `BPF_LINK_CREATE` (the XDP part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// An XSKMAP: the table from receive queue index to AF_XDP socket that the steering program
/// redirects through. Owns its fd.
#[derive(Debug)]
pub struct XskMap {
    fd: OwnedFd,
    max_entries: u32,
}

impl XskMap {
    /// Creates an XSKMAP for receive queues `0..max_entries`.
    pub fn create(max_entries: u32) -> io::Result<XskMap> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_XSKMAP,
            key_size: 4,
            value_size: 4,
            max_entries,
            map_name: object_name("usnetd_xsks"),
            ..Default::default()
        };
        // SAFETY: `attr` is the BPF_MAP_CREATE layout and holds no pointers.
        let fd = unsafe { sys_bpf_fd(BPF_MAP_CREATE, &mut attr, "BPF_MAP_CREATE xskmap")? };
        Ok(XskMap { fd, max_entries })
    }

    /// The number of queue slots.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Steers receive queue `queue` to the bound AF_XDP socket `xsk`.
    pub fn insert(&self, queue: u32, xsk: &impl AsRawFd) -> io::Result<()> {
        let key = queue;
        let value = xsk.as_raw_fd() as u32;
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        // SAFETY: BPF_MAP_UPDATE_ELEM layout; key and value point to live u32s (the map's key
        // and value sizes) for the duration of the call.
        unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr, "BPF_MAP_UPDATE_ELEM xskmap")? };
        Ok(())
    }

    /// Removes receive queue `queue`'s socket (its frames then get the program's fallback).
    pub fn remove(&self, queue: u32) -> io::Result<()> {
        let key = queue;
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            ..Default::default()
        };
        // SAFETY: BPF_MAP_DELETE_ELEM layout; key points to a live u32 during the call.
        unsafe { sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr, "BPF_MAP_DELETE_ELEM xskmap")? };
        Ok(())
    }
}

impl AsRawFd for XskMap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The loaded steering program. Owns its fd (the program lives while the fd or a link does).
#[derive(Debug)]
pub struct SteeringProgram {
    fd: OwnedFd,
}

const LICENSE: &CStr = c"GPL";

impl SteeringProgram {
    /// Loads the program for `map` with `fallback` for queues without a socket. On a verifier
    /// rejection, the error message holds the verifier's log.
    pub fn load(map: &XskMap, fallback: Fallback) -> io::Result<SteeringProgram> {
        Self::load_insns(&steering_insns(map.as_raw_fd(), fallback))
    }

    /// Loads `insns` as an XDP program; on failure loads again with the verifier log on and
    /// puts the log into the error.
    fn load_insns(insns: &[Insn]) -> io::Result<SteeringProgram> {
        match Self::load_with_log(insns, None) {
            Ok(prog) => Ok(prog),
            Err(first) => {
                let mut log = vec![0u8; 64 * 1024];
                match Self::load_with_log(insns, Some(&mut log)) {
                    Ok(prog) => Ok(prog),
                    Err(err) => {
                        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                        let text = String::from_utf8_lossy(&log[..end]);
                        Err(io::Error::new(
                            err.kind(),
                            format!("{first}; verifier log:\n{}", text.trim_end()),
                        ))
                    }
                }
            }
        }
    }

    fn load_with_log(insns: &[Insn], log: Option<&mut [u8]>) -> io::Result<SteeringProgram> {
        let (log_level, log_size, log_buf) = match log {
            Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            prog_name: object_name("usnetd_steer"),
            ..Default::default()
        };
        // SAFETY: BPF_PROG_LOAD layout; `insns` (insn_cnt entries), the NUL-terminated license
        // and the log buffer (log_size bytes, writable) all outlive the call.
        let fd = unsafe { sys_bpf_fd(BPF_PROG_LOAD, &mut attr, "BPF_PROG_LOAD xdp")? };
        Ok(SteeringProgram { fd })
    }

    /// Runs the program once on `frame` (`BPF_PROG_TEST_RUN`, receive queue 0 of the
    /// namespace's loopback device) and returns its XDP action. A redirect is only decided,
    /// not carried out.
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: BPF_PROG_TEST_RUN layout; `frame` is readable for data_size_in bytes during
        // the call; no output buffers are given (null, size 0).
        unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr, "BPF_PROG_TEST_RUN")? };
        Ok(attr.retval)
    }

    /// Attaches the program to interface `ifindex` (of the calling thread's network
    /// namespace) with `xdp_flags` ([`XDP_FLAGS_DRV_MODE`] or [`XDP_FLAGS_SKB_MODE`]). Fails
    /// with `EBUSY` if the interface already has an XDP program.
    pub fn attach(&self, ifindex: u32, xdp_flags: u32) -> io::Result<XdpLink> {
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: xdp_flags,
        };
        // SAFETY: BPF_LINK_CREATE layout; no pointers.
        let fd = unsafe { sys_bpf_fd(BPF_LINK_CREATE, &mut attr, "BPF_LINK_CREATE xdp")? };
        Ok(XdpLink { fd, ifindex })
    }
}

impl AsRawFd for SteeringProgram {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An XDP program attached to an interface. Dropping it (closing the fd) detaches the
/// program; so does the process's exit.
#[derive(Debug)]
pub struct XdpLink {
    fd: OwnedFd,
    ifindex: u32,
}

impl XdpLink {
    /// The interface the program is attached to.
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

impl AsRawFd for XdpLink {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_registers_and_immediates() {
        let insns = steering_insns(7, Fallback::Drop);
        // r2 = *(u32 *)(r1 + 16)
        assert_eq!(insns[0].code, 0x61);
        assert_eq!(insns[0].regs, 0x12);
        assert_eq!(insns[0].off, 16);
        // r1 = map fd 7 (pseudo map fd in src_reg)
        assert_eq!(insns[1].code, 0x18);
        assert_eq!(insns[1].regs, 0x11);
        assert_eq!(insns[1].imm, 7);
        assert_eq!(insns[2], Insn::new(0, 0, 0, 0, 0));
        // r3 = XDP_DROP
        assert_eq!(
            (insns[3].code, insns[3].regs, insns[3].imm),
            (0xb7, 0x03, 1)
        );
        assert_eq!((insns[4].code, insns[4].imm), (0x85, 51));
        assert_eq!(insns[5].code, 0x95);
        assert_eq!(steering_insns(7, Fallback::Pass)[3].imm, 2);
        assert_eq!(size_of::<Insn>(), 8);
    }

    #[test]
    fn attr_layouts_match_the_kernel() {
        assert_eq!(size_of::<MapCreateAttr>(), 44);
        assert_eq!(size_of::<MapElemAttr>(), 32);
        assert_eq!(size_of::<ProgLoadAttr>(), 72);
        assert_eq!(size_of::<TestRunAttr>(), 80);
        assert_eq!(size_of::<LinkCreateAttr>(), 16);
        assert_eq!(&object_name("usnetd_xsks")[..12], b"usnetd_xsks\0");
        assert_eq!(object_name("a-very-long-name-indeed")[15], 0);
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// A frame for test runs: broadcast Ethernet, IPv4 ethertype, zero payload.
    fn frame() -> [u8; 64] {
        let mut f = [0u8; 64];
        f[..6].fill(0xff);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f
    }

    #[test]
    fn empty_map_gives_the_fallback_action() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)");
            return;
        }
        let map = XskMap::create(4).expect("create xskmap");
        let drop = SteeringProgram::load(&map, Fallback::Drop).expect("load drop variant");
        let pass = SteeringProgram::load(&map, Fallback::Pass).expect("load pass variant");
        assert_eq!(drop.test_run(&frame()).unwrap(), action::DROP);
        assert_eq!(pass.test_run(&frame()).unwrap(), action::PASS);
        // Queues past the map's size are refused; an empty slot can be cleared.
        assert!(map.remove(4).is_err());
        assert!(map.remove(3).is_ok());
    }

    #[test]
    fn queue_with_a_socket_is_redirected() {
        if !is_root() {
            eprintln!("skipped: AF_XDP and BPF need root");
            return;
        }
        // A private network namespace on a private thread, so binding to its loopback
        // device touches nothing of the host's.
        let result = std::thread::spawn(|| -> io::Result<(u32, u32, u32)> {
            // SAFETY: unshare affects only this (fresh) thread's network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let map = XskMap::create(2)?;
            let prog = SteeringProgram::load(&map, Fallback::Drop)?;
            let lo = crate::backend::xdp::ifindex("lo")?;
            let config = crate::backend::xdp::XdpConfig {
                rx_ring_size: 64,
                tx_ring_size: 64,
                ..Default::default()
            };
            let xsk = crate::backend::xdp::XskSocket::open(lo, 0, &config)?;
            // test_run reports receive queue 0: a socket on queue 1 changes nothing...
            map.insert(1, &xsk)?;
            let other_queue = prog.test_run(&frame())?;
            // ...a socket on queue 0 makes it a redirect...
            map.insert(0, &xsk)?;
            let own_queue = prog.test_run(&frame())?;
            // ...and removing it brings the fallback back.
            map.remove(0)?;
            let removed = prog.test_run(&frame())?;
            Ok((other_queue, own_queue, removed))
        })
        .join()
        .expect("test thread panicked");
        let (other_queue, own_queue, removed) = result.expect("bpf/xsk setup");
        assert_eq!(other_queue, action::DROP);
        assert_eq!(own_queue, action::REDIRECT);
        assert_eq!(removed, action::DROP);
    }

    #[test]
    fn verifier_rejection_carries_the_log() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        // Reads r2, which is uninitialised at entry: the verifier must refuse it.
        let bad = [
            Insn::new(op::MOV64_IMM, 0, 0, 0, 0),
            Insn::new(0x0f, 0, 2, 0, 0), // r0 += r2
            Insn::new(op::EXIT, 0, 0, 0, 0),
        ];
        let err = SteeringProgram::load_insns(&bad).unwrap_err().to_string();
        assert!(err.contains("BPF_PROG_LOAD"), "{err}");
        assert!(err.contains("verifier log"), "{err}");
        assert!(err.contains("R2"), "{err}");
    }
}
