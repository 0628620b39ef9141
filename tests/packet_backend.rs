//! The AF_PACKET backend on a 4-queue veth pair between two throwaway namespaces: fanout
//! receive over two rings, transmit, and keeping the kernel off the claimed interface.
//! Needs root; skips otherwise.

mod packet_netns;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use packet_netns::*;
use usnetd::backend::packet::{PacketBackend, PacketRing};
use usnetd::backend::{Backend, NicPorts};
use usnetd_shards::port::FrameBatch;

const FLOWS: u32 = 32;
const PER_FLOW: u32 = 4;

/// Polls all receive queues until `want` marked frames arrived or 5 s passed; returns
/// (queue index, frame) of each marked frame and of every frame when `all` is set.
fn collect(
    ports: &mut NicPorts,
    want: usize,
    mut keep: impl FnMut(&[u8]) -> bool,
) -> Vec<(usize, Vec<u8>)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < want && Instant::now() < deadline {
        let mut idle = true;
        for (q, rx) in ports.rx.iter_mut().enumerate() {
            let mut batch = FrameBatch::new();
            if rx.recv(&mut batch) > 0 {
                idle = false;
            }
            for frame in batch.as_slice() {
                if keep(frame) {
                    got.push((q, frame.to_vec()));
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
fn packet_backend_fanout_tx_and_kernel_block() {
    if !require_root("packet_backend_fanout_tx_and_kernel_block") {
        return;
    }
    fanout_tx_and_kernel_block("pk", PacketRing::Frames);
}

#[test]
fn packet_backend_block_ring_fanout_tx_and_kernel_block() {
    if !require_root("packet_backend_block_ring_fanout_tx_and_kernel_block") {
        return;
    }
    fanout_tx_and_kernel_block("pb", PacketRing::Blocks);
}

fn fanout_tx_and_kernel_block(tag: &str, ring: PacketRing) {
    let pair = NsPair::new(tag);
    let backend = PacketBackend {
        rx_sockets: 2,
        ring,
        ..PacketBackend::default()
    };
    // A kernel service on the claimed side, to see whether its kernel answers.
    let listener = in_ns(&pair.a, || TcpListener::bind("10.77.0.1:7777").unwrap());
    assert!(
        in_ns(&pair.b, || tcp_connects(
            "10.77.0.1:7777",
            Duration::from_secs(2)
        )),
        "kernel of the claimed side must answer before the backend opens"
    );

    let mut ports = in_ns(&pair.a, || backend.open(IF_A, 2)).expect("open packet backend");
    assert_eq!(ports.rx.len(), 2);
    assert_eq!(ports.tx.len(), 2);

    // --- receive: several flows from the peer, spread over the two rings by flow.
    let mut sent = HashMap::new();
    in_ns(&pair.b, || {
        let sock = RawSocket::open(IF_B);
        for seq in 0..PER_FLOW {
            for flow in 0..FLOWS {
                let frame = udp_frame(
                    pair.mac_a,
                    pair.mac_b,
                    (IP_B, IP_A),
                    (20000 + flow as u16, 5555),
                    flow,
                    seq,
                );
                sock.send(&frame);
                sent.insert((flow, seq), frame);
            }
        }
    });
    let got = collect(&mut ports, sent.len(), |f| marker(f).is_some());
    assert_eq!(got.len(), sent.len(), "all frames arrive exactly once");
    let mut queue_of_flow: HashMap<u32, Vec<usize>> = HashMap::new();
    for (q, frame) in &got {
        let key = marker(frame).unwrap();
        assert_eq!(
            Some(frame),
            sent.get(&key),
            "frame {key:?} arrives unchanged"
        );
        queue_of_flow.entry(key.0).or_default().push(*q);
    }
    for (flow, queues) in &queue_of_flow {
        assert_eq!(
            distinct(queues).len(),
            1,
            "flow {flow} stays on one ring: {queues:?}"
        );
    }
    let used: Vec<usize> = queue_of_flow.values().map(|q| q[0]).collect();
    assert_eq!(distinct(&used).len(), 2, "{FLOWS} flows use both rings");

    // --- IPv4 fragments of one datagram land on one ring (several source addresses).
    let mut frags_sent = 0;
    in_ns(&pair.b, || {
        let sock = RawSocket::open(IF_B);
        for d in 0..8u8 {
            let src = [10, 77, 1, d + 1];
            for (i, frag) in [0x2000u16, 0x2001, 0x0002].iter().enumerate() {
                let mut l4 = vec![0u8; 8];
                l4.extend_from_slice(MAGIC);
                l4.extend_from_slice(&u32::from(d).to_be_bytes());
                l4.extend_from_slice(&(1000 + i as u32).to_be_bytes());
                sock.send(&ipv4_frame(
                    pair.mac_a,
                    pair.mac_b,
                    (src, IP_A),
                    17,
                    4242,
                    *frag,
                    &l4,
                ));
                frags_sent += 1;
            }
        }
    });
    let got = collect(&mut ports, frags_sent, |f| {
        marker(f).is_some_and(|(_, seq)| seq >= 1000)
    });
    assert_eq!(got.len(), frags_sent, "all fragments arrive");
    let mut queue_of_datagram: HashMap<u32, Vec<usize>> = HashMap::new();
    for (q, frame) in &got {
        queue_of_datagram
            .entry(marker(frame).unwrap().0)
            .or_default()
            .push(*q);
    }
    for (d, queues) in &queue_of_datagram {
        assert_eq!(
            distinct(queues).len(),
            1,
            "fragments of datagram {d}: {queues:?}"
        );
    }

    // --- transmit through both tx queues; the peer sees the exact frames.
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let peer = s.spawn(|| {
            in_ns(&pair.b, || {
                let sock = RawSocket::open(IF_B);
                ready_tx.send(()).unwrap();
                let mut seen = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(5);
                while seen.len() < 16 && Instant::now() < deadline {
                    if let Some(f) = sock.recv(Duration::from_millis(200)) {
                        if marker(&f).is_some_and(|(flow, _)| flow == 900) {
                            seen.push(f);
                        }
                    }
                }
                seen
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let frames: Vec<Vec<u8>> = (0..16)
            .map(|seq| udp_frame(pair.mac_b, pair.mac_a, (IP_A, IP_B), (5555, 6000), 900, seq))
            .collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
        assert_eq!(ports.tx[0].send(&refs[..8]), 8);
        assert_eq!(ports.tx[1].send(&refs[8..]), 8);
        let mut seen = peer.join().unwrap();
        seen.sort_by_key(|f| marker(f).unwrap().1);
        assert_eq!(
            seen, frames,
            "peer receives all transmitted frames unchanged"
        );
    });

    // --- while open, the claimed side's kernel does not answer, but the rings see the SYNs.
    assert!(
        !in_ns(&pair.b, || tcp_connects(
            "10.77.0.1:7777",
            Duration::from_secs(1)
        )),
        "kernel must not answer while the NIC is claimed"
    );
    let syns = collect(&mut ports, 1, |f| {
        f.len() > 37 && f[23] == 6 && f[36..38] == 7777u16.to_be_bytes()
    });
    assert!(!syns.is_empty(), "the rings receive the peer's TCP SYN");

    // --- after drop, the kernel answers again.
    drop(ports);
    assert!(
        wait_until(Duration::from_secs(5), || in_ns(&pair.b, || {
            tcp_connects("10.77.0.1:7777", Duration::from_millis(500))
        })),
        "kernel answers again after the backend is dropped"
    );
    drop(listener);
}

#[test]
fn packet_backend_rejects_bad_config() {
    if !require_root("packet_backend_rejects_bad_config") {
        return;
    }
    let pair = NsPair::new("pc");
    let backend = PacketBackend {
        rx_sockets: 1,
        block_size: 1000,
        ..PacketBackend::default()
    };
    let err = in_ns(&pair.a, || backend.open(IF_A, 1).err()).expect("bad block size refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    // The refused open left nothing behind: the kernel still answers pings of its address.
    let listener = in_ns(&pair.a, || TcpListener::bind("10.77.0.1:7778").unwrap());
    assert!(in_ns(&pair.b, || tcp_connects(
        "10.77.0.1:7778",
        Duration::from_secs(2)
    )));
    drop(listener);
    let missing = in_ns(&pair.a, || {
        PacketBackend::default().open("nosuchif0", 1).err()
    });
    assert!(missing.is_some(), "unknown interface refused");
}
