//! A realistic rule table and the frames that match it.
//!
//! Rules: `R` rules on local address 10.0.0.2 spread round-robin over [`CLIENTS`] client
//! endpoints; 1 % of them (at least one, at most 1000) are listening rules on ports 1..=L,
//! the rest are connection rules (TCP and UDP alternating, each with its own remote address
//! from 100.64.0.0/10, so every key is unique). Flows: by default one per rule (traffic
//! spread uniformly over all rules); with `flows < rules` the first `flows` rules of a
//! pseudo-random order. Each flow contributes one frame (a listening rule's flow comes from a
//! remote address no connection rule uses), and the frames are stored in a pseudo-random
//! order so that large tables miss the CPU caches as real traffic does.

use std::sync::Arc;

use usnetd_shards::endpoint::{EndpointId, EndpointKind, EndpointSink};
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::memport::frames::Ipv4Frame;
use usnetd_shards::memport::FrameSet;
use usnetd_shards::snapshot::Origin;
use usnetd_shards::table::Table;

/// Client endpoints the rules are spread over.
pub const CLIENTS: usize = 16;

const LOCAL: [u8; 4] = [10, 0, 0, 2];
const NIC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];

/// Number of listening rules among `rules`.
pub fn listening_rules(rules: usize) -> usize {
    (rules / 100).clamp(1, 1000).min(rules)
}

/// Rule number `i` of a table with `listening` listening rules.
pub fn rule_key(i: usize, listening: usize) -> FlowKey {
    let proto = if i.is_multiple_of(2) {
        proto::TCP
    } else {
        proto::UDP
    };
    if i < listening {
        return FlowKey {
            local_ip: Ip::v4(LOCAL),
            remote_ip: Ip::UNSPECIFIED,
            local_port: 1 + i as u16,
            remote_port: 0,
            proto,
        };
    }
    let remote = 0x6440_0000u32.wrapping_add(i as u32); // 100.64.0.0/10 and up
    FlowKey {
        local_ip: Ip::v4(LOCAL),
        remote_ip: Ip::v4(remote.to_be_bytes()),
        local_port: 20_000 + (i % 40_000) as u16,
        remote_port: 1024 + ((i * 7) % 60_000) as u16,
        proto,
    }
}

/// The frame of flow `key` (for a listening rule: from 198.18.0.1, port 40000).
pub fn frame_for(key: &FlowKey, frame_len: usize) -> Vec<u8> {
    let v4 = |k: Ip| [k.0[12], k.0[13], k.0[14], k.0[15]];
    let (src_ip, src_port) = if key.is_listening() {
        ([198, 18, 0, 1], 40_000)
    } else {
        (v4(key.remote_ip), key.remote_port)
    };
    Ipv4Frame {
        dst_mac: NIC_MAC,
        src_mac: ROUTER_MAC,
        src_ip,
        dst_ip: v4(key.local_ip),
        proto: key.proto,
        src_port,
        dst_port: key.local_port,
        frame_len,
        ..Ipv4Frame::default()
    }
    .build()
}

/// A permutation of `0..n`: `i -> (i * step + offset) mod n` with `step` coprime to `n`.
pub fn permutation(n: usize) -> impl Iterator<Item = usize> {
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let mut step = if n > 1 { 2_654_435_761 % n } else { 1 };
    while n > 1 && gcd(step, n) != 1 {
        step += 1;
    }
    (0..n).map(move |i| (i * step + n / 3) % n.max(1))
}

/// The table (with `CLIENTS` endpoints whose channels `sink(i)` makes) and the frames.
pub fn build(
    rules: usize,
    flows: usize,
    frame_len: usize,
    mut sink: impl FnMut(usize) -> Arc<dyn EndpointSink>,
) -> (Table, FrameSet) {
    let mut table = Table::new();
    let endpoints: Vec<EndpointId> = (0..CLIENTS)
        .map(|i| table.add_endpoint(EndpointKind::Client, format!("client {i}"), sink(i)))
        .collect();
    let listening = listening_rules(rules);
    for i in 0..rules {
        table
            .add_rule(
                rule_key(i, listening),
                endpoints[i % CLIENTS],
                Origin::Client,
            )
            .expect("rule keys are unique");
    }
    table.publish();
    let flows = flows.clamp(1, rules.max(1));
    let chosen: Vec<usize> = permutation(rules).take(flows).collect();
    let mut frames = FrameSet::new();
    for i in permutation(flows) {
        frames.push(&frame_for(&rule_key(chosen[i], listening), frame_len));
    }
    (table, frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use usnetd_shards::frame::classify;
    use usnetd_shards::memport::MemSink;

    #[test]
    fn permutation_visits_every_index_once() {
        for n in [1, 2, 10, 64, 1000, 4096] {
            let mut seen: Vec<usize> = permutation(n).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>(), "n={n}");
        }
    }

    #[test]
    fn every_frame_matches_a_rule() {
        let (table, frames) = build(2000, 2000, 64, |_| MemSink::for_tests(1, 1));
        assert_eq!(table.rule_count(), 2000);
        assert_eq!(frames.len(), 2000);
        let snap = table.reader().load_full();
        let mut listening_hits = 0;
        for f in frames.iter() {
            assert_eq!(f.len(), 64);
            let key = classify(f).unwrap().incoming_key();
            assert!(snap.lookup(&key).is_some(), "{key:?}");
            if snap.rule(&key).is_none() {
                listening_hits += 1;
            }
        }
        assert_eq!(listening_hits, listening_rules(2000));
    }
}
