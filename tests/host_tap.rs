//! Frames through the kernel's TAP: `deliver()` reaches a kernel socket, and what the kernel
//! sends comes out of `recv()`. Needs root (network namespaces built by tools/testbed).

#[path = "common/netns.rs"]
mod netns;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

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

#[test]
fn host_tap_passes_frames_both_ways() {
    if netns::skip_unless_root("host_tap_passes_frames_both_ways") {
        return;
    }
    let prefix = netns::unique_prefix("uhp");
    let bed = netns::Testbed::up(&prefix, 2);
    let state_dir = std::env::temp_dir().join(format!("usnetd-state-{prefix}"));
    let mut cfg = HostConfig::new("sw0");
    cfg.queues = 2;
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
        assert!(queues.iter().all(|q| q.read_errors() == 0));
        drop(host);
    });
    let _ = std::fs::remove_dir_all(&state_dir);
}
