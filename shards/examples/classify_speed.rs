//! Rough classifier speed: `cargo run --release -p usnetd-shards --example classify_speed`.
//! Prints nanoseconds per frame for a few frame shapes (no assertions: numbers vary by machine).
//! Optional argument: only the shape with this name; `ROUNDS=n` sets the repetitions.

use std::hint::black_box;
use std::time::Instant;

use usnetd_shards::frame::classify;

/// A 64-byte frame: Ethernet, optional 802.1Q tag, IPv4 (20 bytes), UDP, padding.
fn ipv4_udp(i: u8, vlan: bool) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    if vlan {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    f.extend_from_slice(&[10, 0, 0, i, 10, 0, 1, 2]);
    f.extend_from_slice(&[0x30, i, 0x00, 0x35, 0, 8, 0, 0]);
    f.resize(64, 0);
    f
}

/// A 78-byte IPv6/TCP frame.
fn ipv6_tcp(i: u8) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i]);
    f.extend_from_slice(&[0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    f.extend_from_slice(&[0x30, i, 0x01, 0xbb]);
    f.resize(14 + 40 + 20, 0);
    f
}

fn measure(name: &str, frames: &[Vec<u8>]) {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200_000);
    if std::env::args()
        .nth(1)
        .is_some_and(|only| name.trim() != only.trim())
    {
        return;
    }
    let mut ok = 0usize;
    let start = Instant::now();
    for _ in 0..rounds {
        for f in frames {
            if let Ok(c) = classify(black_box(f.as_slice())) {
                // Use the key fields, as a worker would.
                ok += usize::from(c.dst_port & 1) + usize::from(c.src_ip.0[15] ^ c.dst_ip.0[15]);
            }
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / (rounds * frames.len()) as f64;
    println!("{name:>20}: {ns:6.2} ns/frame ({ok})");
}

fn main() {
    let batch = |f: fn(u8) -> Vec<u8>| (0..64u8).map(f).collect::<Vec<_>>();
    measure("ipv4/udp 64B", &batch(|i| ipv4_udp(i, false)));
    measure("vlan ipv4/udp 64B", &batch(|i| ipv4_udp(i, true)));
    measure("ipv6/tcp", &batch(ipv6_tcp));
}
