//! The AF_XDP backend on a 4-queue veth pair between two private network namespaces.
//!
//! Needs root; skips with a message otherwise. Everything runs inside namespaces the test
//! creates (named after the pid) and removes again, also when it fails.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use usnetd::backend::xdp::{XdpBackend, XdpConfig};
use usnetd::backend::{Backend, NicPorts};
use usnetd_shards::port::FrameBatch;

const MAC_A: [u8; 6] = [0x02, 0x75, 0x78, 0x64, 0x70, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0x75, 0x78, 0x64, 0x70, 0x0b];
const IP_A: [u8; 4] = [10, 213, 77, 1];
const IP_B: [u8; 4] = [10, 213, 77, 2];
const MARKER: &[u8] = b"usnetd-xdp-test";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip_str(ip: [u8; 4]) -> String {
    format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3])
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair with 4 queues each way; removed on drop.
struct VethPair {
    ns_a: String,
    ns_b: String,
    if_a: String,
    if_b: String,
}

impl VethPair {
    fn new(tag: &str) -> VethPair {
        let pid = std::process::id();
        let pair = VethPair {
            ns_a: format!("usnetd-{tag}a-{pid}"),
            ns_b: format!("usnetd-{tag}b-{pid}"),
            if_a: format!("x{tag}a{pid}"),
            if_b: format!("x{tag}b{pid}"),
        };
        // The guard exists before anything is created, so a failure below cleans up too.
        run(&["ip", "netns", "add", &pair.ns_a]);
        run(&["ip", "netns", "add", &pair.ns_b]);
        let (a, b) = (pair.ns_a.as_str(), pair.ns_b.as_str());
        let (ia, ib) = (pair.if_a.as_str(), pair.if_b.as_str());
        let (mac_a, mac_b) = (mac_str(MAC_A), mac_str(MAC_B));
        run(&[
            "ip",
            "-n",
            a,
            "link",
            "add",
            ia,
            "address",
            &mac_a,
            "numtxqueues",
            "4",
            "numrxqueues",
            "4",
            "type",
            "veth",
            "peer",
            "name",
            ib,
            "address",
            &mac_b,
            "netns",
            b,
            "numtxqueues",
            "4",
            "numrxqueues",
            "4",
        ]);
        let (ip_a, ip_b) = (
            format!("{}/24", ip_str(IP_A)),
            format!("{}/24", ip_str(IP_B)),
        );
        run(&["ip", "-n", a, "addr", "add", &ip_a, "dev", ia]);
        run(&["ip", "-n", b, "addr", "add", &ip_b, "dev", ib]);
        // Static neighbours: the kernel of A answers without ARP, so its silence while
        // claimed is about the claim, not about a lost ARP exchange.
        run(&[
            "ip",
            "-n",
            a,
            "neigh",
            "add",
            &ip_str(IP_B),
            "lladdr",
            &mac_b,
            "dev",
            ia,
            "nud",
            "permanent",
        ]);
        run(&["ip", "-n", a, "link", "set", ia, "up"]);
        run(&["ip", "-n", b, "link", "set", ib, "up"]);
        // A sender into a veth whose peer runs native XDP needs a real qdisc.
        run(&[
            "tc",
            "-n",
            b,
            "qdisc",
            "replace",
            "dev",
            ib,
            "root",
            "pfifo_fast",
        ]);
        pair
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        // Deleting the namespaces deletes the veth pair.
        for ns in [&self.ns_a, &self.ns_b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Runs `f` on a thread inside network namespace `ns`. Sockets it creates stay in `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on this thread only; the fd is a valid namespace file.
        let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// A packet socket bound to one interface, seeing all its frames.
struct PacketSocket {
    fd: OwnedFd,
}

const ETH_P_ALL: u16 = 0x0003;

impl PacketSocket {
    /// Opens a packet socket on `ifname` of the calling thread's namespace.
    fn open(ifname: &str) -> PacketSocket {
        // SAFETY: plain socket creation, owned right below.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            )
        };
        assert!(
            raw >= 0,
            "socket(AF_PACKET): {}",
            io::Error::last_os_error()
        );
        // SAFETY: fresh fd, owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let index = usnetd::backend::xdp::ifindex(ifname).expect("ifindex");
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ETH_P_ALL.to_be();
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the length passed.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0, "bind(AF_PACKET): {}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const libc::timeval as *const libc::c_void,
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(ret, 0);
        PacketSocket { fd }
    }

    fn send(&self, frame: &[u8]) {
        // Retried a few times: the veth's queue may be momentarily full.
        for _ in 0..100 {
            // SAFETY: `frame` is readable for its length.
            let ret = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    frame.as_ptr() as *const libc::c_void,
                    frame.len(),
                    0,
                )
            };
            if ret == frame.len() as isize {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("packet socket send failed: {}", io::Error::last_os_error());
    }

    /// The next incoming (not outgoing) frame for which `wanted` holds, until `deadline`.
    fn recv_until(&self, deadline: Instant, wanted: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            // SAFETY: all-zero is a valid sockaddr_ll.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length, `from` for `len` bytes.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                    &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..n as usize];
            if wanted(frame) {
                return Some(frame.to_vec());
            }
        }
        None
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet + IPv4 frame around `l4` (protocol `proto`).
fn ipv4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(34 + l4.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + l4.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(l4);
    f
}

/// A UDP frame carrying the test marker and `seq` (UDP checksum 0: none).
fn udp_frame(dst_mac: [u8; 6], src_mac: [u8; 6], src_port: u16, seq: u32) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&src_port.to_be_bytes());
    udp.extend_from_slice(&9999u16.to_be_bytes());
    let len = (8 + MARKER.len() + 4) as u16;
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(MARKER);
    udp.extend_from_slice(&seq.to_be_bytes());
    ipv4_frame(dst_mac, src_mac, IP_B, IP_A, 17, &udp)
}

/// The `seq` of a test UDP frame, if it is one.
fn udp_seq(frame: &[u8]) -> Option<u32> {
    let payload = frame.get(42..)?;
    if frame.get(12..14)? != [0x08, 0x00] || frame[23] != 17 || !payload.starts_with(MARKER) {
        return None;
    }
    let s = payload.get(MARKER.len()..MARKER.len() + 4)?;
    Some(u32::from_be_bytes(s.try_into().ok()?))
}

/// An ICMP echo request from B to A.
fn echo_request(ident: u16, seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&ident.to_be_bytes());
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(MARKER);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv4_frame(MAC_A, MAC_B, IP_B, IP_A, 1, &icmp)
}

fn is_echo(frame: &[u8], icmp_type: u8, ident: u16, seq: u16) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x00]
        && frame[23] == 1
        && frame[34] == icmp_type
        && frame[38..40] == ident.to_be_bytes()
        && frame[40..42] == seq.to_be_bytes()
}

/// Sends an echo request from B; whether A's kernel answers before `wait` is over.
fn kernel_answers_ping(peer: &PacketSocket, seq: u16, wait: Duration) -> bool {
    let ident = std::process::id() as u16;
    peer.send(&echo_request(ident, seq));
    peer.recv_until(Instant::now() + wait, |f| is_echo(f, 0, ident, seq))
        .is_some()
}

/// Polls all receive queues until `deadline`, collecting the frames `keep` selects, with the
/// index of the queue each came from, until `enough` says stop.
fn collect(
    ports: &mut NicPorts,
    deadline: Instant,
    keep: impl Fn(&[u8]) -> bool,
    enough: impl Fn(&[(usize, Vec<u8>)]) -> bool,
) -> Vec<(usize, Vec<u8>)> {
    let mut got = Vec::new();
    while Instant::now() < deadline && !enough(&got) {
        let mut idle = true;
        for (index, queue) in ports.rx.iter_mut().enumerate() {
            let mut batch = FrameBatch::new();
            if queue.recv(&mut batch) > 0 {
                idle = false;
            }
            for frame in batch.as_slice() {
                if keep(frame) {
                    got.push((index, frame.to_vec()));
                }
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    got
}

#[test]
fn xdp_backend_claims_receives_sends_and_releases() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, BPF, AF_XDP)");
        return;
    }
    let pair = VethPair::new("t");
    let if_b = pair.if_b.clone();
    let peer = in_netns(&pair.ns_b, move || PacketSocket::open(&if_b));

    // Before the claim, A's kernel answers: the check below is meaningful.
    assert!(
        kernel_answers_ping(&peer, 1, Duration::from_secs(3)),
        "A's kernel does not answer before the claim: test setup broken"
    );

    let if_a = pair.if_a.clone();
    let mut ports = in_netns(&pair.ns_a, move || {
        XdpBackend::new(XdpConfig::default()).open(&if_a, 6)
    })
    .expect("open the AF_XDP backend");
    assert_eq!(ports.rx.len(), 4, "one receive queue per veth queue");
    assert_eq!(ports.tx.len(), 6, "as many transmit queues as asked for");

    // A second claim of the same NIC, and a claim of a missing one, are refused cleanly.
    let if_a = pair.if_a.clone();
    let (second, missing) = in_netns(&pair.ns_a, move || {
        let backend = XdpBackend::default();
        let second = backend.open(&if_a, 1).map(|_| ());
        let missing = backend.open("usnetd-nonexist", 1).map(|_| ());
        (second, missing)
    });
    let second = second.expect_err("the NIC was claimed twice");
    assert!(second.to_string().contains("bind"), "{second}");
    assert_eq!(
        missing.expect_err("a missing NIC was claimed").kind(),
        io::ErrorKind::NotFound
    );

    // Frames from the peer arrive byte for byte, spread over the queues by flow hash.
    let sent: Vec<Vec<u8>> = (0..64u32)
        .map(|seq| udp_frame(MAC_A, MAC_B, 10_000 + seq as u16 * 7, seq))
        .collect();
    for frame in &sent {
        peer.send(frame);
    }
    let got = collect(
        &mut ports,
        Instant::now() + Duration::from_secs(5),
        |f| udp_seq(f).is_some(),
        |got| got.len() >= sent.len(),
    );
    let mut seen = vec![0u32; sent.len()];
    let mut queues_used = [false; 4];
    for (queue, frame) in &got {
        let seq = udp_seq(frame).unwrap() as usize;
        assert!(seq < sent.len(), "unexpected seq {seq}");
        assert_eq!(frame, &sent[seq], "frame {seq} changed on the way");
        seen[seq] += 1;
        queues_used[*queue] = true;
    }
    let missing: Vec<usize> = (0..sent.len()).filter(|&s| seen[s] == 0).collect();
    assert!(missing.is_empty(), "frames never received: {missing:?}");
    assert!(seen.iter().all(|&n| n == 1), "duplicates: {seen:?}");
    assert!(
        queues_used.iter().filter(|&&u| u).count() >= 2,
        "64 flows all landed on one queue: {queues_used:?}"
    );

    // While claimed, A's kernel never sees the ping: the switch does.
    let ident = std::process::id() as u16;
    peer.send(&echo_request(ident, 2));
    let stolen = collect(
        &mut ports,
        Instant::now() + Duration::from_secs(5),
        |f| is_echo(f, 8, ident, 2),
        |got| !got.is_empty(),
    );
    assert_eq!(stolen.len(), 1, "the echo request did not reach the switch");
    assert!(
        !kernel_answers_ping(&peer, 3, Duration::from_secs(1)),
        "A's kernel answered a ping while the NIC was claimed"
    );

    // Frames sent on every transmit queue (more than the NIC has) reach the peer intact.
    let outgoing: Vec<Vec<u8>> = (0..ports.tx.len() as u32)
        .map(|i| {
            let mut f = udp_frame(MAC_B, MAC_A, 20_000 + i as u16, 1000 + i);
            f[26..30].copy_from_slice(&IP_A);
            f[30..34].copy_from_slice(&IP_B);
            f
        })
        .collect();
    for (queue, frame) in ports.tx.iter_mut().zip(&outgoing) {
        assert_eq!(queue.send(&[frame.as_slice()]), 1, "frame not accepted");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut received = Vec::new();
    while received.len() < outgoing.len() {
        let Some(frame) = peer.recv_until(deadline, |f| udp_seq(f).is_some_and(|s| s >= 1000))
        else {
            break;
        };
        received.push(frame);
    }
    for frame in &outgoing {
        assert!(
            received.contains(frame),
            "frame {:?} sent by the switch never reached the peer",
            udp_seq(frame)
        );
    }

    // An oversized frame is skipped and does not block the rest of its batch.
    let big = vec![0u8; 5000];
    let last = udp_frame(MAC_B, MAC_A, 30_000, 2000);
    assert_eq!(ports.tx[0].send(&[big.as_slice(), last.as_slice()]), 2);
    let got = peer.recv_until(Instant::now() + Duration::from_secs(5), |f| {
        udp_seq(f) == Some(2000)
    });
    assert_eq!(got.as_deref(), Some(last.as_slice()));

    // Dropping the ports detaches XDP: A's kernel answers again.
    drop(ports);
    assert!(
        kernel_answers_ping(&peer, 4, Duration::from_secs(3)),
        "A's kernel does not answer after the ports were dropped"
    );
    drop(pair);
}

/// Rough receive rate of one AF_XDP socket in copy mode (one flow, so one queue). Prints a
/// number; asserts nothing about it. Run with `--ignored --nocapture`.
#[test]
#[ignore]
fn xdp_receive_rate_one_queue() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    measure_receive_rate("r", false);
    measure_receive_rate("s", true);
}

/// One receive-rate run; `threaded`: the receiving veth's NAPI runs as a kernel thread.
fn measure_receive_rate(tag: &str, threaded: bool) {
    let pair = VethPair::new(tag);
    let if_a = pair.if_a.clone();
    let mut ports = in_netns(&pair.ns_a, move || XdpBackend::default().open(&if_a, 1))
        .expect("open the AF_XDP backend");
    if threaded {
        let path = format!("/sys/class/net/{}/threaded", pair.if_a);
        // Possible once XDP gave the veth NAPI; `ip netns exec` mounts the namespace's sysfs.
        run(&[
            "ip",
            "netns",
            "exec",
            &pair.ns_a,
            "sh",
            "-c",
            &format!("echo 1 > {path}"),
        ]);
    }
    let if_b = pair.if_b.clone();
    let seconds = 3;
    let generator = std::thread::spawn({
        let ns = pair.ns_b.clone();
        move || {
            in_netns(&ns, move || {
                let peer = PacketSocket::open(&if_b);
                let frame = udp_frame(MAC_A, MAC_B, 4242, 7);
                let end = Instant::now() + Duration::from_secs(seconds);
                let mut sent = 0u64;
                let mut iov = [libc::iovec {
                    iov_base: frame.as_ptr() as *mut libc::c_void,
                    iov_len: frame.len(),
                }];
                // SAFETY: all-zero is a valid mmsghdr; the iovec is set right below.
                let mut msgs: Vec<libc::mmsghdr> =
                    (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
                for m in &mut msgs {
                    m.msg_hdr.msg_iov = iov.as_mut_ptr();
                    m.msg_hdr.msg_iovlen = 1;
                }
                while Instant::now() < end {
                    // SAFETY: `msgs` holds 64 headers pointing at `iov`, which points at
                    // `frame`; all outlive the call.
                    let ret =
                        unsafe { libc::sendmmsg(peer.fd.as_raw_fd(), msgs.as_mut_ptr(), 64, 0) };
                    if ret > 0 {
                        sent += ret as u64;
                    }
                }
                sent
            })
        }
    });
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut received = [0u64; 4];
    while Instant::now() < end {
        for (i, queue) in ports.rx.iter_mut().enumerate() {
            let mut batch = FrameBatch::new();
            received[i] += queue.recv(&mut batch) as u64;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let sent = generator.join().expect("generator");
    let total: u64 = received.iter().sum();
    println!(
        "AF_XDP copy mode, one flow, threaded NAPI {threaded}: sent {sent}, received {total} \
         ({:.0}/s) per queue {received:?}",
        total as f64 / elapsed
    );
    drop(ports);
    drop(pair);
}
