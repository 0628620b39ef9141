//! The shared-memory channel: per-worker rings, the client's ring, wake-ups, and a client that
//! writes garbage into the shared memory.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use usnetd::channel::shm::{ShmChannel, ShmHandover, ShmSink, ShmSource};
use usnetd_client::shm::{
    poll_readable, SharedRegion, ShmClient, ShmGeometry, CONSUMER_OFFSET, NEED_WAKEUP_OFFSET,
    PRODUCER_OFFSET, RING_CTRL_SIZE,
};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue};

const SLOT: usize = 2048;

fn frame(tag: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..4].copy_from_slice(&seq.to_be_bytes());
    f
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[0], f[1], f[2], f[3]])
}

fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().expect("dup")
}

fn client_of(h: &ShmHandover) -> ShmClient {
    ShmClient::from_fds(
        dup(&h.memfd),
        [dup(&h.to_client_event), dup(&h.to_switch_event)],
    )
    .expect("attach")
}

/// The memory as a (possibly malicious) client maps it, with its geometry.
fn raw_view(h: &ShmHandover, client: &ShmClient) -> (SharedRegion, ShmGeometry) {
    let g = *client.geometry();
    let region = SharedRegion::map(h.memfd.as_fd(), g.total_size() as usize).expect("map");
    (region, g)
}

fn setup(workers: usize, slots: usize) -> (ShmHandover, ShmSink, ShmSource, ShmClient) {
    let (h, sink, source) = ShmChannel::create(workers, slots, SLOT).expect("create");
    let client = client_of(&h);
    (h, sink, source, client)
}

#[test]
fn header_describes_the_layout() {
    let (_h, _sink, _source, client) = setup(3, 64);
    let g = client.geometry();
    assert_eq!(g.to_client_rings(), 3);
    assert_eq!(g.slot_count(), 64);
    assert_eq!(g.slot_size(), SLOT as u32);
    assert_eq!(g.max_frame(), SLOT as u32 - 8);
    assert_eq!(g.ring_count(), 4);
    assert_eq!(g.ring_stride(), RING_CTRL_SIZE as u64 + 64 * SLOT as u64);
}

#[test]
fn bad_geometries_are_refused() {
    assert!(ShmChannel::create(0, 64, SLOT).is_err());
    assert!(ShmChannel::create(2, 63, SLOT).is_err());
    assert!(ShmChannel::create(2, 1 << 17, SLOT).is_err());
    assert!(ShmChannel::create(2, 64, 100).is_err());
    assert!(ShmChannel::create(2, 64, 2000).is_err());
    assert!(ShmChannel::create(300, 64, SLOT).is_err());
}

#[test]
fn workers_rings_arrive_in_order_at_a_consumer_thread() {
    let workers = 4;
    let per_worker = 5000u32;
    let (_h, sink, _source, mut client) = setup(workers, 256);
    let sink = Arc::new(sink);
    let consumer = std::thread::spawn(move || {
        let mut next = vec![0u32; workers];
        let mut bad = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while next.iter().any(|&n| n < per_worker) && Instant::now() < deadline {
            let got = client.recv_batch(|f| {
                let w = f[10] as usize;
                if w >= workers || seq_of(f) != next[w] || f.len() != 60 + (next[w] % 7) as usize {
                    bad += 1;
                } else {
                    next[w] += 1;
                }
            });
            if got == 0 {
                client.wait(Some(Duration::from_millis(200))).expect("wait");
            }
        }
        (next, bad, client.errors())
    });
    let mut producers = Vec::new();
    for w in 0..workers {
        let sink = sink.clone();
        producers.push(std::thread::spawn(move || {
            let mut seq = 0u32;
            let deadline = Instant::now() + Duration::from_secs(60);
            while seq < per_worker && Instant::now() < deadline {
                let frames: Vec<Vec<u8>> = (seq..(seq + 32).min(per_worker))
                    .map(|s| frame(w as u8, s, 60 + (s % 7) as usize))
                    .collect();
                let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
                let n = sink.deliver(w, &refs);
                seq += n as u32;
                if n < refs.len() {
                    std::thread::yield_now();
                }
            }
            seq
        }));
    }
    for p in producers {
        assert_eq!(p.join().unwrap(), per_worker);
    }
    let (next, bad, errors) = consumer.join().unwrap();
    assert_eq!(bad, 0);
    assert_eq!(next, vec![per_worker; workers]);
    assert_eq!(errors, Default::default());
    assert_eq!(sink.errors(), Default::default());
}

#[test]
fn full_ring_refuses_and_oversize_is_skipped() {
    let (_h, sink, _source, mut client) = setup(2, 64);
    let f = frame(1, 0, 100);
    let batch: Vec<&[u8]> = vec![f.as_slice(); 50];
    assert_eq!(sink.deliver(0, &batch), 50);
    assert_eq!(sink.deliver(0, &batch), 14, "64 slots");
    assert_eq!(sink.deliver(0, &batch), 0, "full");
    // The other worker's ring is independent.
    assert_eq!(sink.deliver(1, &batch), 50);
    let big = vec![0u8; SLOT - 7];
    let max = frame(2, 9, SLOT - 8);
    assert_eq!(sink.deliver(1, &[&big, &max, &[1u8; 13]]), 1);
    assert_eq!(sink.errors().oversize, 2);
    let mut lens = Vec::new();
    assert_eq!(client.recv_batch(|f| lens.push(f.len())), 64 + 51);
    assert!(lens.contains(&(SLOT - 8)));
    assert_eq!(sink.deliver(0, &batch), 50, "room again");
}

#[test]
fn client_frames_reach_the_source_in_order() {
    let (_h, _sink, mut source, mut client) = setup(1, 128);
    let mut sent = 0u32;
    while client.send(&frame(5, sent, 64 + (sent % 100) as usize)) {
        sent += 1;
    }
    assert_eq!(sent, 128, "ring holds 128");
    assert!(!client.send(&vec![0u8; SLOT]), "oversize refused");
    let mut seen = Vec::new();
    loop {
        let mut batch = FrameBatch::new();
        let n = source.recv(&mut batch);
        if n == 0 {
            break;
        }
        assert!(n <= 64);
        for f in batch.as_slice() {
            seen.push((seq_of(f), f.len()));
        }
    }
    let want: Vec<(u32, usize)> = (0..128).map(|s| (s, 64 + (s % 100) as usize)).collect();
    assert_eq!(seen, want);
    assert_eq!(source.errors(), Default::default());
}

#[test]
fn sleeping_client_is_woken_by_a_worker() {
    let (h, sink, _source, mut client) = setup(2, 64);
    let (view, g) = raw_view(&h, &client);
    let waiter = std::thread::spawn(move || {
        let woke = client.wait(Some(Duration::from_secs(20))).expect("wait");
        let mut frames = Vec::new();
        client.recv_batch(|f| frames.push(f.to_vec()));
        (woke, frames)
    });
    // Wait (bounded) until the client armed the wake-up on ring 1, i.e. is about to sleep.
    let flag = g.ring_offset(1) as usize + NEED_WAKEUP_OFFSET;
    let deadline = Instant::now() + Duration::from_secs(20);
    while view.read_u32(flag) != Some(1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(view.read_u32(flag), Some(1), "client armed its wake-up");
    let f = frame(9, 42, 60);
    assert_eq!(sink.deliver(1, &[&f]), 1);
    let (woke, frames) = waiter.join().unwrap();
    assert!(woke);
    assert_eq!(frames, vec![f]);
    assert_eq!(view.read_u32(flag), Some(0), "disarmed after waking");
}

#[test]
fn sleeping_switch_is_woken_by_the_client() {
    let (_h, _sink, mut source, mut client) = setup(1, 64);
    assert!(source.arm_wakeup(), "empty: safe to sleep");
    assert!(!poll_readable(source.event_fd(), Some(Duration::ZERO)).unwrap());
    assert!(client.send(&frame(1, 1, 60)));
    assert!(poll_readable(source.event_fd(), Some(Duration::from_secs(10))).unwrap());
    source.disarm_wakeup();
    assert!(!poll_readable(source.event_fd(), Some(Duration::ZERO)).unwrap());
    // Disarmed: a busy switch costs the client no syscall, and the fd stays quiet.
    assert!(client.send(&frame(1, 2, 60)));
    assert!(!poll_readable(source.event_fd(), Some(Duration::ZERO)).unwrap());
    let mut batch = FrameBatch::new();
    assert_eq!(source.recv(&mut batch), 2);
}

#[test]
fn impossible_indices_and_lengths_are_counted() {
    let (h, sink, mut source, mut client) = setup(1, 64);
    let (view, g) = raw_view(&h, &client);
    let to_client = g.ring_offset(0) as usize;
    let to_switch = g.ring_offset(1) as usize;

    // Fill the ring, so the switch must read the consumer index again.
    let f = frame(1, 0, 60);
    assert_eq!(sink.deliver(0, &vec![f.as_slice(); 64]), 64);
    // The client claims to have consumed frames that were never produced.
    view.write_u32(to_client + CONSUMER_OFFSET, 1000);
    assert_eq!(sink.deliver(0, &[&f]), 0);
    assert_eq!(sink.errors().bad_index, 1);
    view.write_u32(to_client + CONSUMER_OFFSET, 64);
    assert_eq!(sink.deliver(0, &[&f]), 1, "recovers when the index is sane");

    // The client publishes more frames than the ring holds.
    view.write_u32(to_switch + PRODUCER_OFFSET, 65);
    let mut batch = FrameBatch::new();
    assert_eq!(source.recv(&mut batch), 0);
    assert!(source.errors().bad_index >= 1);

    // Two frames, the first with an impossible length.
    assert!(view.write_u32(to_switch + PRODUCER_OFFSET, 0));
    assert!(client.send(&frame(2, 1, 60)));
    assert!(client.send(&frame(2, 2, 60)));
    let slot0 = to_switch + RING_CTRL_SIZE as usize;
    view.write_u32(slot0, 0xffff_fff0);
    let mut batch = FrameBatch::new();
    assert_eq!(source.recv(&mut batch), 1);
    assert_eq!(seq_of(batch.as_slice()[0]), 2);
    assert_eq!(source.errors().bad_length, 1);
}

#[test]
fn corrupted_header_is_refused_by_the_client_and_ignored_by_the_switch() {
    let (h, sink, mut source, client) = setup(2, 64);
    let (view, _g) = raw_view(&h, &client);
    for (off, value) in [
        (0usize, 0u32),
        (8, 2),
        (16, 0),
        (24, 3),
        (28, 100),
        (32, 5000),
        (56, 1),
    ] {
        let saved = view.read_u32(off).unwrap();
        view.write_u32(off, value);
        assert!(
            ShmClient::from_fds(
                dup(&h.memfd),
                [dup(&h.to_client_event), dup(&h.to_switch_event)]
            )
            .is_err(),
            "header word at {off} = {value} accepted"
        );
        view.write_u32(off, saved);
    }
    // The switch keeps its own geometry: a trashed header changes nothing for it.
    for off in (0..64).step_by(4) {
        view.write_u32(off, 0xdead_beef);
    }
    assert_eq!(sink.deliver(1, &[&frame(1, 1, 60)]), 1);
    let mut batch = FrameBatch::new();
    assert_eq!(source.recv(&mut batch), 0);
}

#[test]
fn memfd_cannot_be_shrunk_by_the_client() {
    let (h, _sink, _source) = ShmChannel::create(1, 64, SLOT).expect("create");
    let f = std::fs::File::from(dup(&h.memfd));
    assert!(f.set_len(4096).is_err(), "sealed against shrinking");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, .. ProptestConfig::default() })]

    /// Random words written anywhere in the rings' control blocks and slot headers between
    /// the switch's operations: the switch never panics, only delivers what fits, and lends
    /// only frames of valid length.
    #[test]
    fn random_corruption_never_breaks_the_switch(
        writes in prop::collection::vec((0usize..4, 0usize..64, any::<u32>(), 0u8..3), 0..40),
        sends in 0usize..80,
    ) {
        let workers = 2;
        let slots = 32usize;
        let (h, sink, mut source, mut client) = setup(workers, slots);
        let (view, g) = raw_view(&h, &client);
        let max = g.max_frame() as usize;
        for i in 0..sends {
            client.send(&frame(3, i as u32, 14 + i * 13));
        }
        let f = frame(1, 0, 60);
        for (what, pos, value, ring) in writes {
            let ring = ring as u32 % g.ring_count();
            let base = g.ring_offset(ring) as usize;
            let off = match what {
                0 => base + PRODUCER_OFFSET,
                1 => base + CONSUMER_OFFSET,
                2 => base + NEED_WAKEUP_OFFSET,
                _ => base + RING_CTRL_SIZE as usize + (pos % slots) * SLOT,
            };
            view.write_u32(off, value);
            let n = sink.deliver(pos % workers, &[&f, &f, &f]);
            prop_assert!(n <= 3);
            let mut batch = FrameBatch::new();
            let got = source.recv(&mut batch);
            prop_assert!(got <= 64);
            for fr in batch.as_slice() {
                prop_assert!(fr.len() >= 14 && fr.len() <= max);
            }
            // The client side survives whatever the "switch" left too.
            client.recv_batch(|fr| assert!(fr.len() <= max));
        }
    }
}
