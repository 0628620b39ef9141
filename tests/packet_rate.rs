//! Rough receive rate of the AF_PACKET backend (TPACKET_V3) for small UDP frames on a veth
//! pair. A measurement, not a test: ignored by default; run with
//! `cargo test --release --test packet_rate -- --ignored --nocapture`. Needs root.

#[path = "packet_netns/mod.rs"]
mod packet_netns;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use packet_netns::*;
use usnetd::backend::packet::PacketBackend;
use usnetd::backend::Backend;
use usnetd_shards::port::FrameBatch;

fn measure(rx_sockets: usize) {
    let pair = NsPair::new(&format!("pr{rx_sockets}"));
    let backend = PacketBackend {
        rx_sockets,
        ..PacketBackend::default()
    };
    let ports = in_ns(&pair.a, || backend.open(IF_A, 1)).expect("open");
    let frames: Vec<Vec<u8>> = (0..64)
        .map(|flow| {
            udp_frame(
                pair.mac_a,
                pair.mac_b,
                (IP_B, IP_A),
                (20000 + flow as u16, 5555),
                flow,
                0,
            )
        })
        .collect();
    let stop = AtomicBool::new(false);
    let run = Duration::from_secs(3);
    let (sent, counts, elapsed) = std::thread::scope(|s| {
        let generator = s.spawn(|| {
            in_ns(&pair.b, || {
                let sock = RawSocket::open(IF_B);
                sock.bypass_qdisc();
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    sent += sock.send_batch(&frames) as u64;
                }
                sent
            })
        });
        let start = Instant::now();
        let receivers: Vec<_> = ports
            .rx
            .into_iter()
            .map(|mut rx| {
                let stop = &stop;
                s.spawn(move || {
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut batch = FrameBatch::new();
                        let n = rx.recv(&mut batch);
                        count += n as u64;
                        if n == 0 {
                            std::thread::yield_now();
                        }
                    }
                    count
                })
            })
            .collect();
        std::thread::sleep(run);
        stop.store(true, Ordering::Relaxed);
        let elapsed = start.elapsed();
        let counts: Vec<u64> = receivers.into_iter().map(|r| r.join().unwrap()).collect();
        (generator.join().unwrap(), counts, elapsed)
    });
    let total: u64 = counts.iter().sum();
    let secs = elapsed.as_secs_f64();
    println!(
        "TPACKET_V3 rx, {rx_sockets} socket(s): {:.0} frames/s received ({counts:?}), {:.0} frames/s sent by the generator",
        total as f64 / secs,
        sent as f64 / secs
    );
}

#[test]
#[ignore = "measurement; run explicitly with --ignored --nocapture"]
fn packet_rx_rate() {
    if !require_root("packet_rx_rate") {
        return;
    }
    measure(1);
    measure(2);
}
