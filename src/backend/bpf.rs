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
//! - The kernel's fast path (`backend::kernel_pass`): [`KernelPassMap`]s of [`PassKey`]s,
//!   [`PassKey6`]s and [`MacKey`]s, [`PassCounters`], the steering program with the fast path
//!   in front ([`SteeringProgram::load_with_kernel_pass`]) and its egress twin for the kernel's
//!   TAP ([`TapEgressProgram`], attached with tcx: [`TcxLink`]), both from one generator,
//!   `kernel_pass_insns`.
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
const BPF_MAP_LOOKUP_ELEM: libc::c_int = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_TEST_RUN: libc::c_int = 10;
const BPF_LINK_CREATE: libc::c_int = 28;

const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `enum bpf_attach_type`: `BPF_TCX_EGRESS`.
const BPF_TCX_EGRESS: u32 = 47;
/// `enum bpf_attach_type`: `BPF_XDP`.
const BPF_XDP: u32 = 37;
/// `BPF_FUNC_redirect_map`.
const BPF_FUNC_REDIRECT_MAP: i32 = 51;
/// `BPF_FUNC_map_lookup_elem`.
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
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
    /// `BPF_LDX | BPF_MEM | BPF_H`.
    pub const LDX_MEM_H: u8 = 0x69;
    /// `BPF_LDX | BPF_MEM | BPF_B`.
    pub const LDX_MEM_B: u8 = 0x71;
    /// `BPF_LDX | BPF_MEM | BPF_DW`.
    pub const LDX_MEM_DW: u8 = 0x79;
    /// `BPF_STX | BPF_MEM | BPF_W`.
    pub const STX_MEM_W: u8 = 0x63;
    /// `BPF_STX | BPF_MEM | BPF_H`.
    pub const STX_MEM_H: u8 = 0x6b;
    /// `BPF_STX | BPF_MEM | BPF_B`.
    pub const STX_MEM_B: u8 = 0x73;
    /// `BPF_STX | BPF_MEM | BPF_DW`.
    pub const STX_MEM_DW: u8 = 0x7b;
    /// `BPF_ST | BPF_MEM | BPF_W` (store an immediate).
    pub const ST_MEM_W: u8 = 0x62;
    /// `BPF_ST | BPF_MEM | BPF_H`.
    pub const ST_MEM_H: u8 = 0x6a;
    /// `BPF_ALU64 | BPF_MOV | BPF_X`.
    pub const MOV64_REG: u8 = 0xbf;
    /// `BPF_ALU64 | BPF_ADD | BPF_K`.
    pub const ADD64_IMM: u8 = 0x07;
    /// `BPF_ALU64 | BPF_AND | BPF_K`.
    pub const AND64_IMM: u8 = 0x57;
    /// `BPF_JMP | BPF_JEQ | BPF_K`.
    pub const JEQ_IMM: u8 = 0x15;
    /// `BPF_JMP | BPF_JNE | BPF_K`.
    pub const JNE_IMM: u8 = 0x55;
    /// `BPF_JMP | BPF_JGT | BPF_X`.
    pub const JGT_REG: u8 = 0x2d;
    /// `BPF_JMP | BPF_JA`.
    pub const JA: u8 = 0x05;
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

/// A tiny assembler: instructions plus jumps to named labels, resolved by [`Asm::finish`].
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    jumps: Vec<(usize, &'static str)>,
    labels: Vec<(&'static str, usize)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn::new(code, dst, src, off, imm));
    }

    /// A conditional jump (`code`, comparing `dst` with `src` or `imm`) to `label`.
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, label: &'static str) {
        self.jumps.push((self.insns.len(), label));
        self.op(code, dst, src, 0, imm);
    }

    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.insns.len()));
    }

    /// Looks up the key at `fp + key_off` in map `map_fd`; on a hit, jumps to `hit` with
    /// `r7 = counter`. Clobbers r0-r5.
    fn lookup_or_fall_through(
        &mut self,
        map_fd: RawFd,
        key_off: i32,
        counter: i32,
        hit: &'static str,
    ) {
        self.ld_map(1, map_fd);
        self.op(op::MOV64_REG, 2, 10, 0, 0);
        self.op(op::ADD64_IMM, 2, 0, 0, key_off);
        self.op(op::CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM);
        self.op(op::MOV64_IMM, 7, 0, 0, counter);
        self.jump(op::JNE_IMM, 0, 0, 0, hit);
    }

    /// The fast path's lookups for the frame at `r2` (readable through its ports): unless the
    /// byte at `proto_off` is TCP (6) or UDP (17), jumps to "switch". Builds the
    /// [`FamilyPassKey`] of `ip_words` 32-bit words per address at the top of the stack (local
    /// ip, remote ip, local port, remote port from the frame offsets `ips` and `ports`, then the
    /// protocol); for [`PassHook::TapEgress`] jumps to "switch" on a local MAC; then looks up
    /// the connection key and the listening key (remote side zeroed) in `map_fd`, jumping to
    /// "pass" with `r7 = counters.0` or `.1` on a hit. Falls through on a miss.
    #[allow(clippy::too_many_arguments)]
    fn pass_lookups(
        &mut self,
        hook: PassHook,
        proto_off: i16,
        ip_words: i16,
        ips: (i16, i16),
        ports: (i16, i16),
        map_fd: RawFd,
        counters: (i32, i32),
    ) {
        use op::*;
        self.op(LDX_MEM_B, 5, 2, proto_off, 0);
        let key_label = if ip_words == 1 { "key4" } else { "key6" };
        self.jump(JEQ_IMM, 5, 0, 6, key_label);
        self.jump(JNE_IMM, 5, 0, 17, "switch");
        self.label(key_label);
        // Key layout from fp: -(8 + 8 * words) local ip, remote ip, -8 local port, -6 remote
        // port, -4 protocol and padding.
        let key = -(8 + 8 * ip_words);
        let remote = key + 4 * ip_words;
        self.op(ST_MEM_W, 10, 0, -4, 0);
        self.op(STX_MEM_B, 10, 5, -4, 0);
        for i in 0..ip_words {
            self.op(LDX_MEM_W, 5, 2, ips.0 + 4 * i, 0);
            self.op(STX_MEM_W, 10, 5, key + 4 * i, 0);
            self.op(LDX_MEM_W, 5, 2, ips.1 + 4 * i, 0);
            self.op(STX_MEM_W, 10, 5, remote + 4 * i, 0);
        }
        self.op(LDX_MEM_H, 5, 2, ports.0, 0);
        self.op(STX_MEM_H, 10, 5, -8, 0);
        self.op(LDX_MEM_H, 5, 2, ports.1, 0);
        self.op(STX_MEM_H, 10, 5, -6, 0);
        if let PassHook::TapEgress { macs_fd, .. } = hook {
            self.local_mac_or_fall_through(macs_fd, "switch");
        }
        // The connection rule...
        self.lookup_or_fall_through(map_fd, i32::from(key), counters.0, "pass");
        // ...then the listening rule: remote ip and port empty.
        for i in 0..ip_words {
            self.op(ST_MEM_W, 10, 0, remote + 4 * i, 0);
        }
        self.op(ST_MEM_H, 10, 0, -6, 0);
        self.lookup_or_fall_through(map_fd, i32::from(key), counters.1, "pass");
    }

    /// Copies the frame's destination MAC (`r2` = frame start, checked readable) to the
    /// [`MacKey`] at `fp - 56` and looks it up in map `macs_fd`: on a hit, jumps to `hit`.
    /// Clobbers r0-r5 and r7.
    fn local_mac_or_fall_through(&mut self, macs_fd: RawFd, hit: &'static str) {
        self.op(op::LDX_MEM_W, 5, 2, 0, 0);
        self.op(op::STX_MEM_W, 10, 5, -56, 0);
        self.op(op::LDX_MEM_H, 5, 2, 4, 0);
        self.op(op::STX_MEM_H, 10, 5, -52, 0);
        self.op(op::ST_MEM_H, 10, 0, -50, 0);
        self.lookup_or_fall_through(macs_fd, -56, 0, hit);
    }

    /// `dst = map fd` (a 64-bit immediate: two slots).
    fn ld_map(&mut self, dst: u8, fd: RawFd) {
        self.op(op::LD_IMM_DW, dst, BPF_PSEUDO_MAP_FD, 0, fd);
        self.op(0, 0, 0, 0, 0);
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, name) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, i)| *i)
                .expect("jump to a defined label");
            self.insns[*at].off = (target as i64 - *at as i64 - 1) as i16;
        }
        self.insns
    }
}

/// Index of [`PassCounters`]: frames passed to the kernel by a connection (exact) rule.
const COUNT_EXACT: i32 = 0;
/// Index of [`PassCounters`]: frames passed to the kernel by a listening rule.
const COUNT_LISTENING: i32 = 1;
/// Index of [`PassCounters`]: frames of the kernel sent out by a connection rule.
const COUNT_OUT_EXACT: i32 = 2;
/// Index of [`PassCounters`]: frames of the kernel sent out from a listening rule.
const COUNT_OUT_LISTENING: i32 = 3;
/// Entries of [`PassCounters`].
const COUNTERS: usize = 4;

/// `offsetof(struct __sk_buff, vlan_present)`.
const SKB_VLAN_PRESENT: i16 = 20;
/// `offsetof(struct __sk_buff, data)`.
const SKB_DATA: i16 = 76;
/// `offsetof(struct __sk_buff, data_end)`.
const SKB_DATA_END: i16 = 80;
/// `TC_ACT_UNSPEC`: for a tcx program, `TCX_NEXT` (the next program, then the device).
const TC_ACT_UNSPEC: i32 = -1;
/// `BPF_FUNC_redirect`.
const BPF_FUNC_REDIRECT: i32 = 23;

/// Where a kernel fast-path program runs, and what it does with the frames it does not take.
#[derive(Clone, Copy)]
enum PassHook {
    /// XDP on the NIC: frames of the kernel's rules go up its stack (`XDP_PASS`); the others to
    /// the queue's AF_XDP socket as in [`steering_insns`].
    NicIngress { xsk_fd: RawFd, fallback: Fallback },
    /// tcx egress on the kernel's TAP: frames the kernel sends under its rules go straight out
    /// of NIC `nic_ifindex` (`bpf_redirect`), unless addressed to a local endpoint's MAC (in
    /// `macs_fd`) or to a group; the others on to the TAP and the switch.
    TapEgress { nic_ifindex: u32, macs_fd: RawFd },
}

/// A kernel fast-path program (see the module docs of `backend::kernel_pass`) for `hook`: an
/// unfragmented IPv4 (without options) or IPv6 (without extension headers) TCP or UDP frame
/// whose connection key, or else whose listening key, is in `pass4` (IPv4) or `pass6` (IPv6)
/// takes the fast path (counted in `counters`); every other frame takes the switch's.
///
/// The key's local side is the destination of a frame received from the NIC, the source of a
/// frame the kernel sends.
fn kernel_pass_insns(hook: PassHook, pass: [RawFd; 2], counters_fd: RawFd) -> Vec<Insn> {
    use op::*;
    let [pass4_fd, pass6_fd] = pass;
    let egress = matches!(hook, PassHook::TapEgress { .. });
    // Frame offsets of (local ip, remote ip, local port, remote port), IPv4 then IPv6.
    let (v4_ips, v4_ports, v6_ips, v6_ports) = if egress {
        ((26, 30), (34, 36), (22, 38), (54, 56))
    } else {
        ((30, 26), (36, 34), (38, 22), (56, 54))
    };
    let (data, data_end) = if egress {
        (SKB_DATA, SKB_DATA_END)
    } else {
        (0, 4)
    };
    let (count_exact, count_listening) = if egress {
        (COUNT_OUT_EXACT, COUNT_OUT_LISTENING)
    } else {
        (COUNT_EXACT, COUNT_LISTENING)
    };
    let mut a = Asm::default();
    // r6 = ctx; r2 = data; r3 = data_end
    a.op(MOV64_REG, 6, 1, 0, 0);
    a.op(LDX_MEM_W, 2, 6, data, 0);
    a.op(LDX_MEM_W, 3, 6, data_end, 0);
    if egress {
        // A VLAN tag kept out of the frame (hardware offload): the switch's path.
        a.op(LDX_MEM_W, 5, 6, SKB_VLAN_PRESENT, 0);
        a.jump(JNE_IMM, 5, 0, 0, "switch");
    }
    // Ethernet (14) + IPv4 without options (20) + both ports (4) must be there.
    a.op(MOV64_REG, 4, 2, 0, 0);
    a.op(ADD64_IMM, 4, 0, 0, 38);
    a.jump(JGT_REG, 4, 3, 0, "switch");
    if egress {
        // To a group (broadcast, multicast): the switch's path.
        a.op(LDX_MEM_B, 5, 2, 0, 0);
        a.op(AND64_IMM, 5, 0, 0, 1);
        a.jump(JNE_IMM, 5, 0, 0, "switch");
    }
    // Untagged IPv6 (ethertype 0x86dd) or IPv4 (0x0800), read little-endian.
    a.op(LDX_MEM_H, 5, 2, 12, 0);
    a.jump(JEQ_IMM, 5, 0, 0xdd86, "ipv6");
    a.jump(JNE_IMM, 5, 0, 0x0008, "switch");
    // Version 4 with IHL 5.
    a.op(LDX_MEM_B, 5, 2, 14, 0);
    a.jump(JNE_IMM, 5, 0, 0x45, "switch");
    // Not a fragment: MF flag and fragment offset zero (bytes 20-21, little-endian mask).
    a.op(LDX_MEM_H, 5, 2, 20, 0);
    a.op(AND64_IMM, 5, 0, 0, 0xff3f);
    a.jump(JNE_IMM, 5, 0, 0, "switch");
    // TCP or UDP: the key and its lookups.
    a.pass_lookups(
        hook,
        23,
        1,
        v4_ips,
        v4_ports,
        pass4_fd,
        (count_exact, count_listening),
    );
    // Everything else: the switch.
    a.label("switch");
    match hook {
        PassHook::NicIngress { xsk_fd, fallback } => {
            a.op(LDX_MEM_W, 2, 6, XDP_MD_RX_QUEUE_INDEX, 0);
            a.ld_map(1, xsk_fd);
            a.op(MOV64_IMM, 3, 0, 0, fallback.action() as i32);
            a.op(CALL, 0, 0, 0, BPF_FUNC_REDIRECT_MAP);
        }
        PassHook::TapEgress { .. } => a.op(MOV64_IMM, 0, 0, 0, TC_ACT_UNSPEC),
    }
    a.op(EXIT, 0, 0, 0, 0);
    // IPv6: the fixed header (40) and both ports must be there; the next header TCP or UDP
    // (an extension header, fragments included, takes the switch's path).
    a.label("ipv6");
    a.op(MOV64_REG, 4, 2, 0, 0);
    a.op(ADD64_IMM, 4, 0, 0, 58);
    a.jump(JGT_REG, 4, 3, 0, "switch");
    a.pass_lookups(
        hook,
        20,
        4,
        v6_ips,
        v6_ports,
        pass6_fd,
        (count_exact, count_listening),
    );
    a.jump(JA, 0, 0, 0, "switch");
    // The fast path, counted per CPU.
    a.label("pass");
    a.op(STX_MEM_W, 10, 7, -44, 0);
    a.ld_map(1, counters_fd);
    a.op(MOV64_REG, 2, 10, 0, 0);
    a.op(ADD64_IMM, 2, 0, 0, -44);
    a.op(CALL, 0, 0, 0, BPF_FUNC_MAP_LOOKUP_ELEM);
    a.jump(JEQ_IMM, 0, 0, 0, "passed");
    a.op(LDX_MEM_DW, 1, 0, 0, 0);
    a.op(ADD64_IMM, 1, 0, 0, 1);
    a.op(STX_MEM_DW, 0, 1, 0, 0);
    a.label("passed");
    match hook {
        PassHook::NicIngress { .. } => a.op(MOV64_IMM, 0, 0, 0, action::PASS as i32),
        PassHook::TapEgress { nic_ifindex, .. } => {
            // bpf_redirect(nic, 0): out of the NIC; returns TC_ACT_REDIRECT.
            a.op(MOV64_IMM, 1, 0, 0, nic_ifindex as i32);
            a.op(MOV64_IMM, 2, 0, 0, 0);
            a.op(CALL, 0, 0, 0, BPF_FUNC_REDIRECT);
        }
    }
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
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

/// A kernel fast-path key as the steering program builds it from a frame of an address
/// family with `N`-byte addresses: the bytes in network order, as they are in the frame
/// (`repr(C)` of byte arrays only, so no hidden padding). See [`PassKey`], [`PassKey6`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FamilyPassKey<const N: usize> {
    /// The frame's destination address.
    pub local_ip: [u8; N],
    /// The frame's source address (zero in a listening key).
    pub remote_ip: [u8; N],
    /// The destination port.
    pub local_port: [u8; 2],
    /// The source port (zero in a listening key).
    pub remote_port: [u8; 2],
    /// The IP protocol (6 or 17).
    pub proto: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// The key of IPv4 frames (16 bytes).
pub type PassKey = FamilyPassKey<4>;
/// The key of IPv6 frames (40 bytes).
pub type PassKey6 = FamilyPassKey<16>;

impl<const N: usize> FamilyPassKey<N> {
    /// The key for these addresses (network order) and ports (host order).
    pub fn new(
        local_ip: [u8; N],
        remote_ip: [u8; N],
        local_port: u16,
        remote_port: u16,
        proto: u8,
    ) -> Self {
        FamilyPassKey {
            local_ip,
            remote_ip,
            local_port: local_port.to_be_bytes(),
            remote_port: remote_port.to_be_bytes(),
            proto,
            pad: [0; 3],
        }
    }
}

/// A local endpoint's MAC as the kernel's egress program looks it up: the 6 bytes, then two
/// zero bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacKey {
    /// The MAC.
    pub mac: [u8; 6],
    /// Zero.
    pub pad: [u8; 2],
}

impl MacKey {
    /// The key of `mac`.
    pub fn new(mac: [u8; 6]) -> MacKey {
        MacKey { mac, pad: [0; 2] }
    }
}

mod sealed {
    /// Key types of a [`super::KernelPassMap`]: `repr(C)` byte structs without padding, and
    /// the map's name.
    pub trait MapKey: Copy {
        const NAME: &'static str;
    }
    impl MapKey for super::PassKey {
        const NAME: &'static str = "usnetd_kpass4";
    }
    impl MapKey for super::PassKey6 {
        const NAME: &'static str = "usnetd_kpass6";
    }
    impl MapKey for super::MacKey {
        const NAME: &'static str = "usnetd_kmacs";
    }
}

/// A set of keys for the kernel's fast path, a `BPF_MAP_TYPE_HASH` (values unused): the
/// kernel's rules of one address family ([`PassKey`]s or [`PassKey6`]s), whose frames take the
/// fast path, or the local endpoints' MACs ([`MacKey`]s), to which the kernel's frames never
/// take it. Owns its fd.
#[derive(Debug)]
pub struct KernelPassMap<K> {
    fd: OwnedFd,
    max_entries: u32,
    _key: std::marker::PhantomData<K>,
}

impl<K: sealed::MapKey> KernelPassMap<K> {
    /// Creates an empty map for up to `max_entries` keys (memory is allocated up front).
    pub fn create(max_entries: u32) -> io::Result<KernelPassMap<K>> {
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: size_of::<K>() as u32,
            value_size: 4,
            max_entries,
            map_name: object_name(K::NAME),
            ..Default::default()
        };
        // SAFETY: `attr` is the BPF_MAP_CREATE layout and holds no pointers.
        let fd = unsafe { sys_bpf_fd(BPF_MAP_CREATE, &mut attr, "BPF_MAP_CREATE kernel pass")? };
        Ok(KernelPassMap {
            fd,
            max_entries,
            _key: std::marker::PhantomData,
        })
    }

    /// The most keys the map holds.
    pub fn max_entries(&self) -> u32 {
        self.max_entries
    }

    /// Adds `key` (no error when it is there already; `E2BIG`, kind
    /// [`io::ErrorKind::ArgumentListTooLong`], when the map is full).
    pub fn insert(&self, key: &K) -> io::Result<()> {
        let value = 0u32;
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        // SAFETY: BPF_MAP_UPDATE_ELEM layout; key and value point to live objects of the map's
        // key size (`size_of::<K>()`, a padding-free byte struct) and value size for the call.
        unsafe {
            sys_bpf(
                BPF_MAP_UPDATE_ELEM,
                &mut attr,
                "BPF_MAP_UPDATE_ELEM kernel pass",
            )?
        };
        Ok(())
    }

    /// Removes `key`; `Ok(false)` when it was not there.
    pub fn remove(&self, key: &K) -> io::Result<bool> {
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            ..Default::default()
        };
        // SAFETY: BPF_MAP_DELETE_ELEM layout; key points to a live key of the map's key size.
        match unsafe {
            sys_bpf(
                BPF_MAP_DELETE_ELEM,
                &mut attr,
                "BPF_MAP_DELETE_ELEM kernel pass",
            )
        } {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether `key` is in the map.
    pub fn contains(&self, key: &K) -> io::Result<bool> {
        let mut value = 0u32;
        let mut attr = MapElemAttr {
            map_fd: self.fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: &mut value as *mut u32 as u64,
            ..Default::default()
        };
        // SAFETY: BPF_MAP_LOOKUP_ELEM layout; key is readable (the map's key size) and value
        // writable (4 bytes, the map's value size) during the call.
        match unsafe {
            sys_bpf(
                BPF_MAP_LOOKUP_ELEM,
                &mut attr,
                "BPF_MAP_LOOKUP_ELEM kernel pass",
            )
        } {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl<K> AsRawFd for KernelPassMap<K> {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// The fast path's frame counters: a `BPF_MAP_TYPE_PERCPU_ARRAY` of four `u64`s (see
/// [`PassCounts`]), one copy per CPU so that no two CPUs share a cache line. Owns its fd.
#[derive(Debug)]
pub struct PassCounters {
    fd: OwnedFd,
    possible_cpus: usize,
}

/// What [`PassCounters::read`] returns: frames that took the fast path, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassCounts {
    /// From the NIC to the kernel by the kernel's connection rules.
    pub in_by_connection_rules: u64,
    /// From the NIC to the kernel by its listening rules.
    pub in_by_listening_rules: u64,
    /// From the kernel out of the NIC by its connection rules.
    pub out_by_connection_rules: u64,
    /// From the kernel out of the NIC from its listening rules.
    pub out_by_listening_rules: u64,
}

/// The number of possible CPUs (the size of a per-CPU map's value array).
fn possible_cpus() -> io::Result<usize> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    usnetd_shards::cores::parse_core_list(list.trim())
        .ok()
        .and_then(|cpus| cpus.into_iter().max())
        .map(|max| max + 1)
        .ok_or_else(|| io::Error::other(format!("unreadable possible CPU list {list:?}")))
}

impl PassCounters {
    /// Creates the counters, all zero.
    pub fn create() -> io::Result<PassCounters> {
        let possible_cpus = possible_cpus()?;
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_PERCPU_ARRAY,
            key_size: 4,
            value_size: 8,
            max_entries: COUNTERS as u32,
            map_name: object_name("usnetd_kcount"),
            ..Default::default()
        };
        // SAFETY: `attr` is the BPF_MAP_CREATE layout and holds no pointers.
        let fd = unsafe { sys_bpf_fd(BPF_MAP_CREATE, &mut attr, "BPF_MAP_CREATE pass counters")? };
        Ok(PassCounters { fd, possible_cpus })
    }

    /// The frames counted so far, summed over CPUs.
    pub fn read(&self) -> io::Result<PassCounts> {
        let mut sums = [0u64; COUNTERS];
        let mut per_cpu = vec![0u64; self.possible_cpus];
        for (index, sum) in sums.iter_mut().enumerate() {
            let key = index as u32;
            let mut attr = MapElemAttr {
                map_fd: self.fd.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: per_cpu.as_mut_ptr() as u64,
                ..Default::default()
            };
            // SAFETY: BPF_MAP_LOOKUP_ELEM layout; the value buffer holds 8 bytes for each
            // possible CPU, which is what the kernel writes for a per-CPU map of 8-byte values.
            unsafe {
                sys_bpf(
                    BPF_MAP_LOOKUP_ELEM,
                    &mut attr,
                    "BPF_MAP_LOOKUP_ELEM pass counters",
                )?
            };
            *sum = per_cpu.iter().sum();
        }
        Ok(PassCounts {
            in_by_connection_rules: sums[COUNT_EXACT as usize],
            in_by_listening_rules: sums[COUNT_LISTENING as usize],
            out_by_connection_rules: sums[COUNT_OUT_EXACT as usize],
            out_by_listening_rules: sums[COUNT_OUT_LISTENING as usize],
        })
    }
}

impl AsRawFd for PassCounters {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Loads `insns` as a program of `prog_type`; on failure loads again with the verifier log on
/// and puts the log into the error.
fn load_program(prog_type: u32, name: &str, insns: &[Insn]) -> io::Result<OwnedFd> {
    match load_with_log(prog_type, name, insns, None) {
        Ok(fd) => Ok(fd),
        Err(first) => {
            let mut log = vec![0u8; 64 * 1024];
            match load_with_log(prog_type, name, insns, Some(&mut log)) {
                Ok(fd) => Ok(fd),
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

fn load_with_log(
    prog_type: u32,
    name: &str,
    insns: &[Insn],
    log: Option<&mut [u8]>,
) -> io::Result<OwnedFd> {
    let (log_level, log_size, log_buf) = match log {
        Some(buf) => (1, buf.len() as u32, buf.as_mut_ptr() as u64),
        None => (0, 0, 0),
    };
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level,
        log_size,
        log_buf,
        prog_name: object_name(name),
        ..Default::default()
    };
    // SAFETY: BPF_PROG_LOAD layout; `insns` (insn_cnt entries), the NUL-terminated license
    // and the log buffer (log_size bytes, writable) all outlive the call.
    unsafe { sys_bpf_fd(BPF_PROG_LOAD, &mut attr, "BPF_PROG_LOAD") }
}

/// Runs program `prog` once on `frame` (`BPF_PROG_TEST_RUN`) and returns what it returned. A
/// redirect is only decided, not carried out.
fn test_run_program(prog: &OwnedFd, frame: &[u8]) -> io::Result<u32> {
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
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

    /// Loads the program with the kernel's fast path in front: frames whose key is in `pass4`
    /// or `pass6` go to the kernel's stack (counted in `counters`), the others as
    /// [`Self::load`] says.
    pub fn load_with_kernel_pass(
        map: &XskMap,
        fallback: Fallback,
        pass4: &KernelPassMap<PassKey>,
        pass6: &KernelPassMap<PassKey6>,
        counters: &PassCounters,
    ) -> io::Result<SteeringProgram> {
        Self::load_insns(&kernel_pass_insns(
            PassHook::NicIngress {
                xsk_fd: map.as_raw_fd(),
                fallback,
            },
            [pass4.as_raw_fd(), pass6.as_raw_fd()],
            counters.as_raw_fd(),
        ))
    }

    fn load_insns(insns: &[Insn]) -> io::Result<SteeringProgram> {
        let fd = load_program(BPF_PROG_TYPE_XDP, "usnetd_steer", insns)?;
        Ok(SteeringProgram { fd })
    }

    /// Runs the program once on `frame` (`BPF_PROG_TEST_RUN`, receive queue 0 of the
    /// namespace's loopback device) and returns its XDP action. A redirect is only decided,
    /// not carried out.
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        test_run_program(&self.fd, frame)
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

/// The kernel's egress fast path: a `BPF_PROG_TYPE_SCHED_CLS` program for the egress of the
/// kernel's TAP (what `PassHook::TapEgress` says). Owns its fd.
#[derive(Debug)]
pub struct TapEgressProgram {
    fd: OwnedFd,
}

impl TapEgressProgram {
    /// Loads the program: the kernel's frames whose key (source as the local side) is in
    /// `pass4` or `pass6` leave through NIC `nic_ifindex` (counted in `counters`) unless their
    /// destination MAC is in `macs` or a group address; the others go on to the TAP.
    pub fn load(
        nic_ifindex: u32,
        pass4: &KernelPassMap<PassKey>,
        pass6: &KernelPassMap<PassKey6>,
        macs: &KernelPassMap<MacKey>,
        counters: &PassCounters,
    ) -> io::Result<TapEgressProgram> {
        let insns = kernel_pass_insns(
            PassHook::TapEgress {
                nic_ifindex,
                macs_fd: macs.as_raw_fd(),
            },
            [pass4.as_raw_fd(), pass6.as_raw_fd()],
            counters.as_raw_fd(),
        );
        let fd = load_program(BPF_PROG_TYPE_SCHED_CLS, "usnetd_kout", &insns)?;
        Ok(TapEgressProgram { fd })
    }

    /// Runs the program once on `frame` (`BPF_PROG_TEST_RUN`) and returns its verdict
    /// ([`tc_action::REDIRECT`] or [`tc_action::UNSPEC`]). The redirect is not carried out.
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        test_run_program(&self.fd, frame)
    }

    /// Attaches the program to the egress of interface `ifindex` (tcx, Linux 6.6 and later;
    /// after any programs there). Dropping the link detaches it.
    pub fn attach(&self, ifindex: u32) -> io::Result<TcxLink> {
        let mut attr = LinkCreateAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            target_ifindex: ifindex,
            attach_type: BPF_TCX_EGRESS,
            flags: 0,
        };
        // SAFETY: BPF_LINK_CREATE layout (the tcx part zero: append, any revision); no
        // pointers.
        let fd = unsafe { sys_bpf_fd(BPF_LINK_CREATE, &mut attr, "BPF_LINK_CREATE tcx egress")? };
        Ok(TcxLink { _fd: fd })
    }
}

/// Verdicts of a tcx program, as [`TapEgressProgram::test_run`] returns them.
pub mod tc_action {
    /// `TC_ACT_UNSPEC` (-1): on to the next program, then the device.
    pub const UNSPEC: u32 = u32::MAX;
    /// `TC_ACT_REDIRECT`.
    pub const REDIRECT: u32 = 7;
}

/// A tcx program attached to an interface; dropping it (closing the fd) detaches it, and so
/// does the process's exit or the interface's removal.
#[derive(Debug)]
pub struct TcxLink {
    _fd: OwnedFd,
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

    /// An IPv4 frame from 10.0.0.2:`sport` to 10.0.0.1:`dport` with protocol `proto`.
    fn ipv4_frame(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&46u16.to_be_bytes());
        f[22] = 64;
        f[23] = proto;
        f[26..30].copy_from_slice(&[10, 0, 0, 2]);
        f[30..34].copy_from_slice(&[10, 0, 0, 1]);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn kernel_pass_layouts() {
        assert_eq!(size_of::<PassKey>(), 16);
        assert_eq!(size_of::<PassKey6>(), 40);
        let k = PassKey::new([10, 0, 0, 1], [10, 0, 0, 2], 5000, 4000, 17);
        assert_eq!(k.local_port, [0x13, 0x88]);
        assert_eq!(k.remote_port, [0x0f, 0xa0]);
        assert_eq!(size_of::<MacKey>(), 8);
        // Every jump lands inside the program and none makes a loop; it ends with an exit.
        let hooks = [
            PassHook::NicIngress {
                xsk_fd: 3,
                fallback: Fallback::Drop,
            },
            PassHook::TapEgress {
                nic_ifindex: 2,
                macs_fd: 3,
            },
        ];
        for hook in hooks {
            let insns = kernel_pass_insns(hook, [4, 6], 5);
            for (i, insn) in insns.iter().enumerate() {
                if matches!(insn.code, op::JEQ_IMM | op::JNE_IMM | op::JGT_REG | op::JA) {
                    let target = i as i64 + 1 + insn.off as i64;
                    assert!(
                        target >= 0 && (target as usize) < insns.len(),
                        "jump at {i}"
                    );
                    // Forward, or back to the switch's block (which exits) from the IPv6 part.
                    let t = &insns[target as usize];
                    let to_switch = (t.off == XDP_MD_RX_QUEUE_INDEX && t.code == op::LDX_MEM_W)
                        || (t.code == op::MOV64_IMM && t.imm == TC_ACT_UNSPEC);
                    assert!(
                        target > i as i64 || to_switch,
                        "jump at {i}: {insn:?} -> {target}"
                    );
                }
            }
            assert_eq!(insns.last().unwrap().code, op::EXIT);
        }
    }

    #[test]
    fn kernel_pass_sends_only_its_rules_frames_to_the_kernel() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let xsks = XskMap::create(4).expect("xskmap");
        let pass = KernelPassMap::<PassKey>::create(16).expect("kernel pass map");
        let pass6 = KernelPassMap::<PassKey6>::create(16).expect("kernel pass map (IPv6)");
        let counters = PassCounters::create().expect("counters");
        let prog =
            SteeringProgram::load_with_kernel_pass(&xsks, Fallback::Drop, &pass, &pass6, &counters)
                .expect("load");
        let run = |f: &[u8]| prog.test_run(f).expect("test run");
        let udp = ipv4_frame(17, 4000, 5000);
        // No rule: the switch's way (no socket on queue 0 here: the fallback, drop).
        assert_eq!(run(&udp), action::DROP);
        // A connection rule passes exactly its flow.
        let exact = PassKey::new([10, 0, 0, 1], [10, 0, 0, 2], 5000, 4000, 17);
        pass.insert(&exact).unwrap();
        assert!(pass.contains(&exact).unwrap());
        assert_eq!(run(&udp), action::PASS);
        assert_eq!(run(&ipv4_frame(17, 4001, 5000)), action::DROP);
        assert_eq!(run(&ipv4_frame(6, 4000, 5000)), action::DROP);
        // A listening rule passes every remote of its local port and protocol.
        let listening = PassKey::new([10, 0, 0, 1], [0; 4], 5000, 0, 17);
        pass.insert(&listening).unwrap();
        assert_eq!(run(&ipv4_frame(17, 4001, 5000)), action::PASS);
        assert_eq!(run(&ipv4_frame(17, 4001, 5001)), action::DROP);
        // What the switch must see itself: fragments, options, VLAN tags, other ethertypes,
        // short frames.
        let mut more_fragments = udp.clone();
        more_fragments[20] = 0x20;
        assert_eq!(run(&more_fragments), action::DROP);
        let mut later_fragment = udp.clone();
        later_fragment[21] = 0x01;
        assert_eq!(run(&later_fragment), action::DROP);
        let mut dont_fragment = udp.clone();
        dont_fragment[20] = 0x40;
        assert_eq!(run(&dont_fragment), action::PASS);
        let mut options = udp.clone();
        options[14] = 0x46;
        assert_eq!(run(&options), action::DROP);
        let mut vlan = vec![0u8; 4];
        vlan.splice(0..0, udp[..12].iter().copied());
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        vlan.extend_from_slice(&udp[12..]);
        assert_eq!(run(&vlan), action::DROP);
        let mut ipv6 = udp.clone();
        ipv6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(run(&ipv6), action::DROP);
        assert_eq!(run(&udp[..37]), action::DROP);
        assert_eq!(run(&udp[..38]), action::PASS);
        assert_eq!(run(&udp[..14]), action::DROP);
        // Removed rules stop passing.
        assert!(pass.remove(&listening).unwrap());
        assert!(!pass.remove(&listening).unwrap());
        assert_eq!(run(&ipv4_frame(17, 4001, 5000)), action::DROP);
        assert!(pass.remove(&exact).unwrap());
        assert_eq!(run(&udp), action::DROP);
        // Counted: 3 by the connection rule (udp, dont_fragment, udp[..38]), 1 by listening.
        let counts = counters.read().unwrap();
        assert_eq!(
            (counts.in_by_connection_rules, counts.in_by_listening_rules),
            (3, 1)
        );
        assert_eq!(
            (
                counts.out_by_connection_rules,
                counts.out_by_listening_rules
            ),
            (0, 0)
        );
    }

    const LOCAL6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const REMOTE6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    /// An IPv6 frame from [fd77::1]:`sport` to [fd77::2]:`dport` with next header `next`.
    fn ipv6_frame(next: u8, sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 80];
        f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[14] = 0x60;
        f[18..20].copy_from_slice(&26u16.to_be_bytes());
        f[20] = next;
        f[21] = 64;
        f[22..38].copy_from_slice(&REMOTE6);
        f[38..54].copy_from_slice(&LOCAL6);
        f[54..56].copy_from_slice(&sport.to_be_bytes());
        f[56..58].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn kernel_pass_ipv6() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let xsks = XskMap::create(4).expect("xskmap");
        let pass4 = KernelPassMap::<PassKey>::create(16).expect("map");
        let pass6 = KernelPassMap::<PassKey6>::create(16).expect("map (IPv6)");
        let counters = PassCounters::create().expect("counters");
        let prog = SteeringProgram::load_with_kernel_pass(
            &xsks,
            Fallback::Drop,
            &pass4,
            &pass6,
            &counters,
        )
        .expect("load");
        let run = |f: &[u8]| prog.test_run(f).expect("test run");
        let tcp = ipv6_frame(6, 4000, 22);
        assert_eq!(run(&tcp), action::DROP);
        // An IPv4 key of the same ports does not pass IPv6 frames.
        pass4
            .insert(&PassKey::new([0, 0, 0, 2], [0; 4], 22, 0, 6))
            .unwrap();
        assert_eq!(run(&tcp), action::DROP);
        let exact = PassKey6::new(LOCAL6, REMOTE6, 22, 4000, 6);
        pass6.insert(&exact).unwrap();
        assert_eq!(run(&tcp), action::PASS);
        assert_eq!(run(&ipv6_frame(6, 4001, 22)), action::DROP);
        assert_eq!(run(&ipv6_frame(17, 4000, 22)), action::DROP);
        pass6
            .insert(&PassKey6::new(LOCAL6, [0; 16], 22, 0, 6))
            .unwrap();
        assert_eq!(run(&ipv6_frame(6, 4001, 22)), action::PASS);
        // A fragment header (44) or any other extension header: the switch's.
        assert_eq!(run(&ipv6_frame(44, 4000, 22)), action::DROP);
        assert_eq!(run(&ipv6_frame(0, 4000, 22)), action::DROP);
        assert_eq!(run(&tcp[..57]), action::DROP);
        assert_eq!(run(&tcp[..58]), action::PASS);
        // Removed: back to the switch.
        assert!(pass6.remove(&exact).unwrap());
        assert!(pass6
            .remove(&PassKey6::new(LOCAL6, [0; 16], 22, 0, 6))
            .unwrap());
        assert_eq!(run(&tcp), action::DROP);
        let counts = counters.read().unwrap();
        assert_eq!(
            (counts.in_by_connection_rules, counts.in_by_listening_rules),
            (2, 1)
        );
    }

    /// `frame` as the kernel sends the reply: addresses, ports and MACs swapped.
    fn reply(frame: &[u8]) -> Vec<u8> {
        let mut f = frame.to_vec();
        let v6 = f[12..14] == [0x86, 0xdd];
        let (ips, len, ports) = if v6 { (22, 16, 54) } else { (26, 4, 34) };
        let mut swap = |a: usize, b: usize, n: usize| {
            for i in 0..n {
                f.swap(a + i, b + i);
            }
        };
        swap(0, 6, 6);
        swap(ips, ips + len, len);
        swap(ports, ports + 2, 2);
        f
    }

    #[test]
    fn egress_fast_path_sends_out_only_the_kernels_rules_frames() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let pass4 = KernelPassMap::<PassKey>::create(16).expect("map");
        let pass6 = KernelPassMap::<PassKey6>::create(16).expect("map (IPv6)");
        let macs = KernelPassMap::<MacKey>::create(16).expect("mac map");
        let counters = PassCounters::create().expect("counters");
        let prog = TapEgressProgram::load(1, &pass4, &pass6, &macs, &counters).expect("load (tcx)");
        let run = |f: &[u8]| prog.test_run(f).expect("test run");
        use tc_action::{REDIRECT, UNSPEC};
        // The kernel's reply from 10.0.0.1:5000 to 10.0.0.2:4000 (UDP).
        let udp = reply(&ipv4_frame(17, 4000, 5000));
        assert_eq!(run(&udp), UNSPEC);
        let exact = PassKey::new([10, 0, 0, 1], [10, 0, 0, 2], 5000, 4000, 17);
        pass4.insert(&exact).unwrap();
        assert_eq!(run(&udp), REDIRECT);
        // Keys are the local side's: a frame *to* port 5000 from 4000 is another flow.
        assert_eq!(run(&ipv4_frame(17, 4000, 5000)), UNSPEC);
        assert_eq!(run(&reply(&ipv4_frame(17, 4001, 5000))), UNSPEC);
        assert_eq!(run(&reply(&ipv4_frame(6, 4000, 5000))), UNSPEC);
        // From a listening rule's port: any remote.
        pass4
            .insert(&PassKey::new([10, 0, 0, 1], [0; 4], 5000, 0, 17))
            .unwrap();
        assert_eq!(run(&reply(&ipv4_frame(17, 4001, 5000))), REDIRECT);
        // To a local endpoint's MAC, or to a group: the switch's.
        let peer_mac = [2, 0, 0, 0, 0, 1];
        assert_eq!(&udp[..6], &peer_mac);
        macs.insert(&MacKey::new(peer_mac)).unwrap();
        assert_eq!(run(&udp), UNSPEC);
        assert!(macs.remove(&MacKey::new(peer_mac)).unwrap());
        assert_eq!(run(&udp), REDIRECT);
        let mut broadcast = udp.clone();
        broadcast[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(run(&broadcast), UNSPEC);
        let mut multicast = udp.clone();
        multicast[..6].copy_from_slice(&[0x01, 0x00, 0x5e, 0, 0, 1]);
        assert_eq!(run(&multicast), UNSPEC);
        // Fragments, options, VLAN tags, short frames: the switch's.
        let mut fragment = udp.clone();
        fragment[20] = 0x20;
        assert_eq!(run(&fragment), UNSPEC);
        let mut options = udp.clone();
        options[14] = 0x46;
        assert_eq!(run(&options), UNSPEC);
        let mut vlan = vec![0u8; 4];
        vlan.splice(0..0, udp[..12].iter().copied());
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        vlan.extend_from_slice(&udp[12..]);
        assert_eq!(run(&vlan), UNSPEC);
        assert_eq!(run(&udp[..37]), UNSPEC);
        // IPv6, from the kernel's connection [fd77::2]:22 -> [fd77::1]:4000.
        let tcp6 = reply(&ipv6_frame(6, 4000, 22));
        assert_eq!(run(&tcp6), UNSPEC);
        pass6
            .insert(&PassKey6::new(LOCAL6, REMOTE6, 22, 4000, 6))
            .unwrap();
        assert_eq!(run(&tcp6), REDIRECT);
        macs.insert(&MacKey::new(peer_mac)).unwrap();
        assert_eq!(run(&tcp6), UNSPEC);
        assert_eq!(run(&reply(&ipv6_frame(44, 4000, 22))), UNSPEC);
        // Counted apart from the receive side: udp twice, tcp6 once by connection rules, one
        // frame from the listening rule.
        let counts = counters.read().unwrap();
        assert_eq!(
            counts,
            PassCounts {
                out_by_connection_rules: 3,
                out_by_listening_rules: 1,
                ..PassCounts::default()
            }
        );
    }

    #[test]
    fn kernel_pass_map_reports_full() {
        if !is_root() {
            eprintln!("skipped: BPF maps need root");
            return;
        }
        let pass = KernelPassMap::<PassKey>::create(2).expect("map");
        pass.insert(&PassKey::new([10, 0, 0, 1], [0; 4], 1, 0, 6))
            .unwrap();
        pass.insert(&PassKey::new([10, 0, 0, 1], [0; 4], 2, 0, 6))
            .unwrap();
        // Updating an existing key is fine; a third key is refused.
        pass.insert(&PassKey::new([10, 0, 0, 1], [0; 4], 2, 0, 6))
            .unwrap();
        let err = pass
            .insert(&PassKey::new([10, 0, 0, 1], [0; 4], 3, 0, 6))
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ArgumentListTooLong, "{err}");
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
