//! Frames through the kernel's TAP: `deliver()` reaches a kernel socket, and what the kernel
//! sends comes out of `recv()`. Needs root (network namespaces built by tools/testbed).

#[path = "common/netns.rs"]
mod netns;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use usnetd::host::gso::{checksum_add, checksum_finish};
use usnetd::host::takeover::ip_json;
use usnetd::host::{HostConfig, HostKernel};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue};

const TIMEOUT: Duration = Duration::from_secs(60);

fn parse_mac(text: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// An Ethernet + IPv4 + UDP frame (UDP checksum 0: none).
fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

/// `frame` (from [`udp_frame`]) with its UDP checksum filled in.
fn with_udp_checksum(mut frame: Vec<u8>) -> Vec<u8> {
    let udp = &frame[34..];
    let pseudo = checksum_add(0, &frame[26..34]) + 17 + udp.len() as u32;
    let c = checksum_finish(checksum_add(pseudo, udp));
    let c = if c == 0 { 0xffff } else { c };
    frame[40..42].copy_from_slice(&c.to_be_bytes());
    frame
}

/// With coalescing, one batch of two interleaved flows (checksummed and not, a shorter last
/// datagram, a corrupted one) becomes super-packets, and the kernel's socket receives every
/// good datagram, each flow in order, and not the corrupted one.
fn coalesced_datagrams_arrive_whole(
    sink: &usnetd::host::tap::TapSink,
    nic_mac: [u8; 6],
    peer_mac: [u8; 6],
) {
    let socket = UdpSocket::bind("10.77.0.2:4243").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut frames = Vec::new();
    let mut expected: Vec<(u16, Vec<u8>)> = Vec::new();
    for i in 0..40u16 {
        let sport = 6000 + i % 2;
        let len = if i >= 38 { 7 } else { 100 };
        let payload: Vec<u8> = (0..len)
            .map(|k| (i as u8).wrapping_mul(31) ^ k as u8)
            .collect();
        let frame = udp_frame(
            nic_mac,
            peer_mac,
            [10, 77, 0, 1],
            [10, 77, 0, 2],
            sport,
            4243,
            &payload,
        );
        let mut frame = if sport == 6000 {
            with_udp_checksum(frame)
        } else {
            frame
        };
        if i == 20 {
            // A corrupted payload under a checksum: the kernel must drop it, as it would
            // without the switch.
            frame[50] ^= 0xff;
        } else {
            expected.push((sport, payload));
        }
        frames.push(frame);
    }
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    let before = sink.super_packets();
    assert_eq!(sink.deliver(0, &refs), frames.len());
    assert!(sink.coalescing());
    assert!(
        sink.super_packets() >= before + 2,
        "no super-packet written"
    );
    let mut got: Vec<(u16, Vec<u8>)> = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..expected.len() {
        let (n, from) = socket.recv_from(&mut buf).unwrap();
        got.push((from.port(), buf[..n].to_vec()));
    }
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        socket.recv_from(&mut buf).is_err(),
        "the corrupted datagram arrived"
    );
    for sport in [6000, 6001] {
        let of = |v: &[(u16, Vec<u8>)]| {
            v.iter()
                .filter(|(p, _)| *p == sport)
                .map(|(_, d)| d.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(of(&got), of(&expected), "flow from port {sport}");
    }
}

/// Whether the IPv4 header and the UDP/TCP checksum of an Ethernet+IPv4 frame are valid.
fn ipv4_checksums_valid(frame: &[u8]) -> bool {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let l4 = 14 + ihl;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    if checksum_finish(checksum_add(0, &frame[14..l4])) != 0 || 14 + total > frame.len() {
        return false;
    }
    let segment = &frame[l4..14 + total];
    let pseudo = checksum_add(0, &frame[26..34]) + u32::from(frame[23]) + segment.len() as u32;
    checksum_finish(checksum_add(pseudo, segment)) == 0
}

#[test]
fn host_tap_passes_frames_both_ways() {
    frames_both_ways(false, true);
}

#[test]
fn host_tap_passes_frames_both_ways_with_offload() {
    frames_both_ways(true, true);
}

/// The same with every write a writev(2) of its own (NO_IO_URING).
#[test]
fn host_tap_passes_frames_both_ways_with_offload_without_io_uring() {
    frames_both_ways(true, false);
}

fn frames_both_ways(offload: bool, io_uring: bool) {
    if netns::skip_unless_root("host_tap_passes_frames_both_ways") {
        return;
    }
    let prefix = netns::unique_prefix(match (offload, io_uring) {
        (false, _) => "uhp",
        (true, true) => "uho",
        (true, false) => "uhw",
    });
    let bed = netns::Testbed::up(&prefix, 2);
    let state_dir = std::env::temp_dir().join(format!("usnetd-state-{prefix}"));
    let mut cfg = HostConfig::new("sw0");
    cfg.queues = 2;
    cfg.offload = offload;
    cfg.coalesce = offload;
    cfg.io_uring = io_uring;
    cfg.state_dir = state_dir.clone();
    netns::in_netns(&bed.sw(), TIMEOUT, move || {
        let host = HostKernel::start(&cfg).unwrap();
        let tap = host.tap().name().to_string();
        let nic_mac = parse_mac(
            ip_json(&["link", "show", "dev", "sw0"]).unwrap()[0]["address"]
                .as_str()
                .unwrap(),
        );
        let peer_mac = [0x02, 0x77, 0, 0, 0, 1];

        // Switch -> kernel: a datagram from the peer to a socket bound in this namespace,
        // once through each worker's queue.
        let socket = UdpSocket::bind("10.77.0.2:4242").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let sink = host.sink();
        for worker in 0..2 {
            let payload = format!("hello kernel {worker}");
            let frame = udp_frame(
                nic_mac,
                peer_mac,
                [10, 77, 0, 1],
                [10, 77, 0, 2],
                5353,
                4242,
                payload.as_bytes(),
            );
            assert_eq!(sink.deliver(worker, &[&frame]), 1);
            let mut buf = [0u8; 256];
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], payload.as_bytes());
            assert_eq!(from.to_string(), "10.77.0.1:5353");
        }
        // A runt is refused, the frames around it are not.
        let good = udp_frame(
            nic_mac,
            peer_mac,
            [10, 77, 0, 1],
            [10, 77, 0, 2],
            5353,
            4242,
            b"after runt",
        );
        assert_eq!(sink.deliver(0, &[&good, &[0u8; 3], &good]), 2);
        assert_eq!(sink.refused(), 1);

        if offload {
            coalesced_datagrams_arrive_whole(&sink, nic_mac, peer_mac);
        }
        // The writes went through io_uring where this kernel has it, and only when asked.
        if io_uring && usnetd::host::uring::BatchRing::new().is_ok() {
            assert!(sink.io_uring());
            assert!(sink.ring_writes() > 0, "no write went through io_uring");
        } else {
            assert_eq!(sink.ring_writes(), 0);
        }

        // Kernel -> switch: a datagram to the neighbour (static ARP entry on the TAP) comes
        // out of one of the TAP's receive queues.
        netns::ip(&[
            "neigh",
            "replace",
            "10.77.0.1",
            "lladdr",
            "02:77:00:00:00:01",
            "dev",
            &tap,
            "nud",
            "permanent",
        ]);
        let mut queues = host.rx_queues();
        assert_eq!(queues.len(), 2);
        let sender = UdpSocket::bind("10.77.0.2:0").unwrap();
        sender.send_to(b"hello switch", "10.77.0.1:7777").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut found = None;
        'wait: while Instant::now() < deadline {
            for queue in queues.iter_mut() {
                let mut batch = FrameBatch::new();
                queue.recv(&mut batch);
                for frame in batch.as_slice() {
                    // IPv4, UDP, destination port 7777.
                    if frame.len() >= 42
                        && frame[12..14] == [0x08, 0x00]
                        && frame[23] == 17
                        && frame[36..38] == 7777u16.to_be_bytes()
                    {
                        found = Some(frame.to_vec());
                        break 'wait;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let frame = found.expect("the kernel's datagram never came out of the TAP");
        assert_eq!(frame[0..6], peer_mac);
        assert_eq!(frame[6..12], nic_mac);
        assert_eq!(frame[26..30], [10, 77, 0, 2]);
        assert_eq!(frame[30..34], [10, 77, 0, 1]);
        assert_eq!(&frame[42..], b"hello switch");
        assert!(ipv4_checksums_valid(&frame), "bad checksum: {frame:02x?}");
        assert!(queues.iter().all(|q| q.read_errors() == 0));
        drop(host);
    });
    let _ = std::fs::remove_dir_all(&state_dir);
}

/// An Ethernet + IPv4 + TCP frame with valid checksums and the given TCP options.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
) -> Vec<u8> {
    let tcp_len = 20 + options.len();
    let mut f = udp_frame(dst_mac, src_mac, src.0, dst.0, 0, 0, &[]);
    f.truncate(34);
    f[23] = 6;
    f[16..18].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum_finish(checksum_add(0, &f[14..34]));
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&src.1.to_be_bytes());
    f.extend_from_slice(&dst.1.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&ack.to_be_bytes());
    f.push(((tcp_len / 4) as u8) << 4);
    f.push(flags);
    f.extend_from_slice(&65535u16.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    f.extend_from_slice(options);
    let pseudo = checksum_add(0, &f[26..34]) + 6 + tcp_len as u32;
    let sum = checksum_finish(checksum_add(pseudo, &f[34..]));
    f[50..52].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The kernel's TCP through an offloading TAP: its super-segments come out of `recv()` as
/// wire segments of at most one MSS, contiguous, with valid checksums.
#[test]
fn host_tap_offload_segments_kernel_tcp() {
    if netns::skip_unless_root("host_tap_offload_segments_kernel_tcp") {
        return;
    }
    const MSS: usize = 1400;
    const BYTES: usize = 10 * MSS;
    let prefix = netns::unique_prefix("uhs");
    let bed = netns::Testbed::up(&prefix, 1);
    let state_dir = std::env::temp_dir().join(format!("usnetd-state-{prefix}"));
    let mut cfg = HostConfig::new("sw0");
    cfg.offload = true;
    cfg.state_dir = state_dir.clone();
    netns::in_netns(&bed.sw(), TIMEOUT, move || {
        let host = HostKernel::start(&cfg).unwrap();
        let tap = host.tap().name().to_string();
        let nic_mac = parse_mac(
            ip_json(&["link", "show", "dev", "sw0"]).unwrap()[0]["address"]
                .as_str()
                .unwrap(),
        );
        let peer_mac = [0x02, 0x77, 0, 0, 0, 1];
        netns::ip(&[
            "neigh",
            "replace",
            "10.77.0.1",
            "lladdr",
            "02:77:00:00:00:01",
            "dev",
            &tap,
            "nud",
            "permanent",
        ]);
        let mut queue = host.rx_queues().pop().unwrap();
        let sink = host.sink();
        // The kernel side: connect and send BYTES (the thread inherits this namespace).
        let client = std::thread::spawn(|| {
            use std::io::Write;
            let addr = "10.77.0.1:80".parse().unwrap();
            let mut stream =
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).unwrap();
            stream
                .set_write_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
            stream.write_all(&data).unwrap();
            // Keep the socket until the peer side has seen everything.
            std::thread::sleep(Duration::from_secs(2));
        });

        let deadline = Instant::now() + Duration::from_secs(20);
        let mut syn = None;
        let mut received: Vec<u8> = Vec::new();
        let mut next_seq = 0u32;
        let mut largest = 0;
        while Instant::now() < deadline && received.len() < BYTES {
            let mut batch = FrameBatch::new();
            queue.recv(&mut batch);
            let mut reply = None;
            for frame in batch.as_slice() {
                let is_tcp_80 = frame.len() >= 54
                    && frame[12..14] == [0x08, 0x00]
                    && frame[23] == 6
                    && frame[36..38] == 80u16.to_be_bytes();
                if !is_tcp_80 {
                    continue;
                }
                assert!(ipv4_checksums_valid(frame), "bad checksum: {frame:02x?}");
                let sport = u16::from_be_bytes([frame[34], frame[35]]);
                let seq = u32::from_be_bytes([frame[38], frame[39], frame[40], frame[41]]);
                let flags = frame[47];
                let l4_len = usize::from(frame[46] >> 4) * 4;
                if flags & 0x02 != 0 {
                    // SYN: answer SYN-ACK with MSS 1400.
                    syn = Some(sport);
                    next_seq = seq.wrapping_add(1);
                    reply = Some(tcp_frame(
                        nic_mac,
                        peer_mac,
                        ([10, 77, 0, 1], 80),
                        ([10, 77, 0, 2], sport),
                        1000,
                        next_seq,
                        0x12,
                        &[2, 4, (MSS >> 8) as u8, MSS as u8],
                    ));
                    continue;
                }
                let payload = &frame[34 + l4_len..];
                if payload.is_empty() {
                    continue;
                }
                assert!(payload.len() <= MSS, "segment of {} bytes", payload.len());
                assert_eq!(seq, next_seq, "segments out of order");
                largest = largest.max(frame.len());
                received.extend_from_slice(payload);
                next_seq = next_seq.wrapping_add(payload.len() as u32);
                reply = Some(tcp_frame(
                    nic_mac,
                    peer_mac,
                    ([10, 77, 0, 1], 80),
                    ([10, 77, 0, 2], sport),
                    1001,
                    next_seq,
                    0x10,
                    &[],
                ));
            }
            if let Some(reply) = reply {
                assert_eq!(sink.deliver(0, &[&reply]), 1);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(syn.is_some(), "no SYN from the kernel");
        assert_eq!(received.len(), BYTES);
        assert!(received
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i % 251) as u8));
        assert!(largest <= 14 + 20 + 20 + MSS);
        assert_eq!(queue.read_errors(), 0);
        assert!(
            queue.super_segments() > 0,
            "the kernel never handed a super-segment"
        );
        client.join().unwrap();
        drop(host);
    });
    let _ = std::fs::remove_dir_all(&state_dir);
}
