//! Test helpers shared by the AF_PACKET and macvtap backend tests: a pair of throwaway network
//! namespaces joined by a 4-queue veth pair, running code inside one of them, a raw packet
//! socket, and frame builders. Everything stays inside the namespaces made here.

#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use usnetd::backend::sysutil::{if_nametoindex, poll_readable, setsockopt, socket};

/// The address of side A (the claimed side) and side B (the peer).
pub const IP_A: [u8; 4] = [10, 77, 0, 1];
/// The peer's address.
pub const IP_B: [u8; 4] = [10, 77, 0, 2];
/// Marks the test's frames in their UDP payload.
pub const MAGIC: &[u8; 8] = b"usnetdT!";

/// Whether the test can run; prints why not.
pub fn require_root(test: &str) -> bool {
    // SAFETY: plain syscall without arguments.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping {test}: needs root (network namespaces)");
        return false;
    }
    true
}

fn sh(args: &[&str]) -> io::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, panicking with its stderr on failure.
pub fn must(args: &[&str]) -> String {
    sh(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Whether a command succeeds.
pub fn succeeds(args: &[&str]) -> bool {
    sh(args).is_ok()
}

/// Two namespaces `a` (claimed side, interface `va`) and `b` (peer, interface `vb`) joined by a
/// veth pair with 4 queues each way; removed on drop.
pub struct NsPair {
    /// Claimed side's namespace.
    pub a: String,
    /// Peer's namespace.
    pub b: String,
    /// MAC of `va`.
    pub mac_a: [u8; 6],
    /// MAC of `vb`.
    pub mac_b: [u8; 6],
}

/// The claimed side's interface.
pub const IF_A: &str = "va";
/// The peer's interface.
pub const IF_B: &str = "vb";

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next().expect("mac"), 16).expect("mac hex");
    }
    mac
}

impl NsPair {
    /// Creates the namespaces; `tag` keeps names of different tests apart.
    pub fn new(tag: &str) -> NsPair {
        let pid = std::process::id();
        let mut pair = NsPair {
            a: format!("usn{tag}a{pid}"),
            b: format!("usn{tag}b{pid}"),
            mac_a: [0; 6],
            mac_b: [0; 6],
        };
        must(&["ip", "netns", "add", &pair.a]);
        must(&["ip", "netns", "add", &pair.b]);
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        must(&[
            "ip",
            "-n",
            a,
            "link",
            "add",
            IF_A,
            "numtxqueues",
            "4",
            "numrxqueues",
            "4",
            "type",
            "veth",
            "peer",
            "name",
            IF_B,
            "netns",
            b,
            "numtxqueues",
            "4",
            "numrxqueues",
            "4",
        ]);
        for (ns, dev, ip) in [(a, IF_A, "10.77.0.1/24"), (b, IF_B, "10.77.0.2/24")] {
            for key in ["all", "default"] {
                let _ = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
                ]);
            }
            must(&["ip", "-n", ns, "addr", "add", ip, "dev", dev]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        pair.mac_a = ns_mac(&pair.a, IF_A);
        pair.mac_b = ns_mac(&pair.b, IF_B);
        // Static neighbours: no ARP needed in either direction.
        must(&[
            "ip",
            "-n",
            &pair.b,
            "neigh",
            "replace",
            "10.77.0.1",
            "lladdr",
            &fmt_mac(&pair.mac_a),
            "dev",
            IF_B,
            "nud",
            "permanent",
        ]);
        must(&[
            "ip",
            "-n",
            &pair.a,
            "neigh",
            "replace",
            "10.77.0.2",
            "lladdr",
            &fmt_mac(&pair.mac_b),
            "dev",
            IF_A,
            "nud",
            "permanent",
        ]);
        pair
    }
}

/// The MAC of `dev` in namespace `ns`.
pub fn ns_mac(ns: &str, dev: &str) -> [u8; 6] {
    let out = must(&["ip", "-n", ns, "-br", "link", "show", dev]);
    let field = out
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("no mac in {out:?}"));
    parse_mac(field)
}

/// `aa:bb:..` form of a MAC.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Drop for NsPair {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.a]);
        let _ = sh(&["ip", "netns", "del", &self.b]);
    }
}

/// Runs `f` on a thread that entered namespace `ns` (sockets it makes live there).
pub fn in_ns<R: Send>(ns: &str, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            let file = File::open(format!("/run/netns/{ns}")).expect("open netns");
            // SAFETY: plain syscall on a valid fd; affects only this thread.
            let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// A raw packet socket bound to one interface (receives everything on it).
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
}

impl RawSocket {
    /// Opens one on `ifname` of the calling thread's namespace.
    pub fn open(ifname: &str) -> RawSocket {
        let ifindex = if_nametoindex(ifname).expect("ifindex");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32).expect("socket");
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: valid sockaddr_ll of the given size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        let size: libc::c_int = 8 << 20;
        setsockopt(
            fd.as_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size,
            "rcvbuf",
        )
        .unwrap();
        RawSocket { fd, ifindex }
    }

    /// Enables PACKET_QDISC_BYPASS (for generators).
    pub fn bypass_qdisc(&self) {
        let one: libc::c_int = 1;
        setsockopt(
            self.fd.as_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            &one,
            "bypass",
        )
        .unwrap();
    }

    /// Sends one frame (blocking).
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: `frame` is valid for reads of its length.
        let ret = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            ret,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }

    /// Sends up to 64 frames with one sendmmsg without blocking; returns how many went.
    pub fn send_batch(&self, frames: &[Vec<u8>]) -> usize {
        let n = frames.len().min(64);
        // SAFETY: plain C structs; all-zero is valid.
        let mut iov: [libc::iovec; 64] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; 64] = unsafe { std::mem::zeroed() };
        for i in 0..n {
            iov[i].iov_base = frames[i].as_ptr() as *mut _;
            iov[i].iov_len = frames[i].len();
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the arrays point to live frames for the duration of the call.
        let ret = unsafe {
            libc::sendmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as u32,
                libc::MSG_DONTWAIT,
            )
        };
        ret.max(0) as usize
    }

    /// Receives one frame within `timeout`, skipping outgoing ones.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if !poll_readable(self.fd.as_fd(), left.as_millis().max(1) as i32).unwrap() {
                continue;
            }
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `buf`, `from` and `len` are valid for writes of their sizes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let _ = self.ifindex;
            return Some(buf[..n as usize].to_vec());
        }
    }
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in header.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4 frame carrying `l4` with protocol `proto`; `frag` is the IPv4
/// flags+offset field (0 for an unfragmented datagram).
pub fn ipv4_frame(
    dst: [u8; 6],
    src: [u8; 6],
    ips: ([u8; 4], [u8; 4]),
    proto: u8,
    id: u16,
    frag: u16,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&ips.0);
    ip[16..20].copy_from_slice(&ips.1);
    let sum = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// A UDP frame (checksum 0) whose payload is [`MAGIC`], `flow` and `seq`.
pub fn udp_frame(
    dst: [u8; 6],
    src: [u8; 6],
    ips: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    flow: u32,
    seq: u32,
) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&ports.0.to_be_bytes());
    udp.extend_from_slice(&ports.1.to_be_bytes());
    udp.extend_from_slice(&((8 + 16) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(MAGIC);
    udp.extend_from_slice(&flow.to_be_bytes());
    udp.extend_from_slice(&seq.to_be_bytes());
    ipv4_frame(dst, src, ips, 17, seq as u16, 0, &udp)
}

/// The (flow, seq) of a frame made by [`udp_frame`] (or a fragment carrying the marker).
pub fn marker(frame: &[u8]) -> Option<(u32, u32)> {
    let pos = frame.windows(MAGIC.len()).position(|w| w == MAGIC)?;
    let rest = frame.get(pos + 8..pos + 16)?;
    Some((
        u32::from_be_bytes(rest[0..4].try_into().ok()?),
        u32::from_be_bytes(rest[4..8].try_into().ok()?),
    ))
}

/// Tries a TCP connection to `addr` from the calling thread's namespace.
pub fn tcp_connects(addr: &str, timeout: Duration) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), timeout).is_ok()
}

/// Waits (bounded) until `f` holds.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Keeps only the distinct values, for readable assertion messages.
pub fn distinct<T: std::hash::Hash + Eq + Copy>(items: &[T]) -> HashSet<T> {
    items.iter().copied().collect()
}
