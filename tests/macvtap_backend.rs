//! The macvtap passthru backend on a veth pair between two throwaway namespaces: receive,
//! transmit, kernel exclusion and removal of the macvtap. Needs root; skips otherwise.

#[path = "packet_netns/mod.rs"]
mod packet_netns;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use packet_netns::*;
use usnetd::backend::macvtap::{macvtap_name, MacvtapBackend};
use usnetd::backend::sysutil::if_nametoindex;
use usnetd::backend::Backend;
use usnetd_shards::port::FrameBatch;

#[test]
fn macvtap_backend_rx_tx_and_cleanup() {
    rx_tx_and_cleanup(true);
}

/// The same with one read(2) per frame (NO_IO_URING).
#[test]
fn macvtap_backend_rx_tx_and_cleanup_without_io_uring() {
    rx_tx_and_cleanup(false);
}

fn rx_tx_and_cleanup(io_uring: bool) {
    if !require_root("macvtap_backend_rx_tx_and_cleanup") {
        return;
    }
    let pair = NsPair::new(if io_uring { "mv" } else { "mvw" });
    let listener = in_ns(&pair.a, || TcpListener::bind("10.77.0.1:7777").unwrap());
    let backend = MacvtapBackend {
        queues: 2,
        io_uring,
        ..Default::default()
    };
    let (ports, name) = in_ns(&pair.a, || {
        let name = macvtap_name(IF_A, if_nametoindex(IF_A).unwrap());
        (backend.open(IF_A, 3), name)
    });
    let mut ports = ports.expect("open macvtap backend");
    assert_eq!(ports.rx.len(), 2);
    assert_eq!(ports.tx.len(), 3);
    assert!(
        succeeds(&["ip", "-n", &pair.a, "link", "show", &name]),
        "macvtap {name} exists while open"
    );

    // --- receive frames of several flows from the peer.
    let mut sent = HashMap::new();
    in_ns(&pair.b, || {
        let sock = RawSocket::open(IF_B);
        for seq in 0..4u32 {
            for flow in 0..16u32 {
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
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < sent.len() && Instant::now() < deadline {
        for rx in ports.rx.iter_mut() {
            let mut batch = FrameBatch::new();
            rx.recv(&mut batch);
            got.extend(
                batch
                    .as_slice()
                    .iter()
                    .filter(|f| marker(f).is_some())
                    .map(|f| f.to_vec()),
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got.len(), sent.len(), "all frames arrive exactly once");
    for flow in 0..16u32 {
        let seqs: Vec<u32> = got
            .iter()
            .filter_map(|f| marker(f).filter(|(fl, _)| *fl == flow).map(|(_, seq)| seq))
            .collect();
        assert_eq!(seqs, [0, 1, 2, 3], "flow {flow}'s frames arrive in order");
    }
    for frame in &got {
        let key = marker(frame).unwrap();
        assert_eq!(
            Some(frame),
            sent.get(&key),
            "frame {key:?} arrives unchanged"
        );
    }

    // --- transmit through every tx queue.
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::scope(|s| {
        let peer = s.spawn(|| {
            in_ns(&pair.b, || {
                let sock = RawSocket::open(IF_B);
                ready_tx.send(()).unwrap();
                let mut seen = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(5);
                while seen.len() < 9 && Instant::now() < deadline {
                    if let Some(f) = sock.recv(Duration::from_millis(200)) {
                        if marker(&f).is_some_and(|(flow, _)| flow == 901) {
                            seen.push(f);
                        }
                    }
                }
                seen
            })
        });
        ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let frames: Vec<Vec<u8>> = (0..9)
            .map(|seq| udp_frame(pair.mac_b, pair.mac_a, (IP_A, IP_B), (5555, 6000), 901, seq))
            .collect();
        for (i, chunk) in frames.chunks(3).enumerate() {
            let refs: Vec<&[u8]> = chunk.iter().map(|f| f.as_slice()).collect();
            assert_eq!(ports.tx[i].send(&refs), 3);
        }
        let mut seen = peer.join().unwrap();
        seen.sort_by_key(|f| marker(f).unwrap().1);
        assert_eq!(
            seen, frames,
            "peer receives all transmitted frames unchanged"
        );
    });

    // --- the kernel of the claimed side gets nothing while open.
    assert!(
        !in_ns(&pair.b, || tcp_connects(
            "10.77.0.1:7777",
            Duration::from_secs(1)
        )),
        "kernel must not answer while the NIC is claimed"
    );

    // --- drop removes the macvtap and gives the NIC back to the kernel.
    drop(ports);
    assert!(
        !succeeds(&["ip", "-n", &pair.a, "link", "show", &name]),
        "macvtap {name} removed on drop"
    );
    assert!(
        wait_until(Duration::from_secs(5), || in_ns(&pair.b, || {
            tcp_connects("10.77.0.1:7777", Duration::from_millis(500))
        })),
        "kernel answers again after the backend is dropped"
    );
    drop(listener);
}

#[test]
fn macvtap_name_fits_ifnamsiz() {
    assert_eq!(macvtap_name("eth0", 2), "eth0usnetdmvt");
    let long = macvtap_name("enp0s31f6", 0xdead_beef);
    assert_eq!(long, "usnmvtdeadbeef");
    assert!(long.len() < 16);
}
