//! The Unix-datagram channel: delivery, reception, limits and hang-up, without root.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use usnetd::channel::uds::UdsChannel;
use usnetd_client::channel::{PacketChannel, UdsChannel as ClientUds};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{FrameBatch, RxQueue};

const MTU: usize = 1500;

/// A 60-byte frame carrying `tag` and `seq`.
fn frame(tag: u8, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![tag; len];
    f[..4].copy_from_slice(&seq.to_be_bytes());
    f
}

fn seq_of(f: &[u8]) -> u32 {
    u32::from_be_bytes([f[0], f[1], f[2], f[3]])
}

fn drain(client: &mut ClientUds) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; MTU + 14];
    while let Some(n) = client.recv(&mut buf).expect("recv") {
        out.push(buf[..n].to_vec());
    }
    out
}

#[test]
fn delivered_frames_arrive_one_per_datagram_in_order() {
    let (client_fd, sink, _source) = UdsChannel::pair(MTU).expect("pair");
    let mut client = ClientUds::new(client_fd);
    let frames: Vec<Vec<u8>> = (0..40).map(|i| frame(7, i, 60 + i as usize)).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    assert_eq!(sink.deliver(0, &refs), 40);
    let got = drain(&mut client);
    assert_eq!(got, frames);
}

#[test]
fn client_frames_are_lent_by_the_source() {
    let (client_fd, _sink, mut source) = UdsChannel::pair(MTU).expect("pair");
    let mut client = ClientUds::new(client_fd);
    for i in 0..100u32 {
        assert!(client.send(&frame(3, i, 64)).expect("send"));
    }
    let mut seen = Vec::new();
    for _ in 0..10 {
        let mut batch = FrameBatch::new();
        let n = source.recv(&mut batch);
        assert_eq!(n, batch.len());
        assert!(n <= 64);
        seen.extend(batch.as_slice().iter().map(|f| (seq_of(f), f.len())));
        if seen.len() == 100 {
            break;
        }
    }
    let want: Vec<(u32, usize)> = (0..100).map(|i| (i, 64)).collect();
    assert_eq!(seen, want);
    let mut batch = FrameBatch::new();
    assert_eq!(source.recv(&mut batch), 0, "nothing left");
}

#[test]
fn full_socket_accepts_fewer_and_never_blocks() {
    let (_client_fd, sink, _source) = UdsChannel::pair(MTU).expect("pair");
    let f = frame(1, 0, 60);
    let batch: Vec<&[u8]> = vec![f.as_slice(); 32];
    let mut total = 0;
    let mut short = None;
    // Socket buffers are a few MiB at most; 1M frames of 60 bytes always fill them.
    for round in 0..(1_000_000 / 32) {
        let n = sink.deliver(0, &batch);
        total += n;
        if n < 32 {
            short = Some(round);
            break;
        }
    }
    assert!(short.is_some(), "the socket never filled ({total} frames)");
    assert!(total > 0);
    assert_eq!(sink.deliver(0, &batch), 0, "still full");
    assert!(
        sink.stats()
            .full_out
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 32
    );
    assert!(!sink.is_closed());
}

#[test]
fn oversize_frames_are_not_delivered() {
    let (client_fd, sink, _source) = UdsChannel::pair(MTU).expect("pair");
    let mut client = ClientUds::new(client_fd);
    let ok1 = frame(1, 1, 60);
    let max = frame(1, 2, MTU + 14);
    let big = frame(1, 3, MTU + 15);
    let ok2 = frame(1, 4, 60);
    let n = sink.deliver(0, &[&ok1, &big, &max, &ok2, &[]]);
    assert_eq!(n, 3);
    let got = drain(&mut client);
    assert_eq!(got, vec![ok1, max, ok2]);
    assert_eq!(
        sink.stats()
            .oversize_out
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn oversize_client_datagrams_are_dropped() {
    let (client_fd, _sink, mut source) = UdsChannel::pair(MTU).expect("pair");
    let mut client = ClientUds::new(client_fd);
    assert!(client.send(&frame(2, 1, MTU + 100)).unwrap());
    assert!(client.send(&frame(2, 2, 60)).unwrap());
    let mut batch = FrameBatch::new();
    assert_eq!(source.recv(&mut batch), 1);
    assert_eq!(seq_of(batch.as_slice()[0]), 2);
    assert_eq!(
        source
            .stats()
            .oversize_in
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn peer_close_is_detected() {
    let (client_fd, sink, source) = UdsChannel::pair(MTU).expect("pair");
    let f = frame(1, 0, 60);
    assert_eq!(sink.deliver(0, &[&f]), 1);
    assert!(!sink.is_closed());
    drop::<OwnedFd>(client_fd);
    assert_eq!(sink.deliver(0, &[&f]), 0);
    assert!(sink.is_closed());
    assert!(source.is_closed());
    assert_eq!(sink.deliver(0, &[&f]), 0);
}

#[test]
fn several_workers_deliver_at_once() {
    let (client_fd, sink, _source) = UdsChannel::pair(MTU).expect("pair");
    let sink = Arc::new(sink);
    let workers = 4u8;
    let per_worker = 2000u32;
    let mut threads = Vec::new();
    for w in 0..workers {
        let sink = sink.clone();
        threads.push(std::thread::spawn(move || {
            let mut seq = 0;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while seq < per_worker && std::time::Instant::now() < deadline {
                let frames: Vec<Vec<u8>> = (seq..(seq + 16).min(per_worker))
                    .map(|s| frame(w, s, 60))
                    .collect();
                let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
                seq += sink.deliver(w as usize, &refs) as u32;
                if seq < per_worker {
                    std::thread::yield_now();
                }
            }
            seq
        }));
    }
    let mut client = ClientUds::new(client_fd);
    let mut next = vec![0u32; workers as usize];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while next.iter().any(|&n| n < per_worker) && std::time::Instant::now() < deadline {
        for f in drain(&mut client) {
            let w = f[59] as usize;
            assert_eq!(seq_of(&f), next[w], "worker {w} out of order");
            next[w] += 1;
        }
        let _ = client.wait(Some(Duration::from_millis(100)));
    }
    for t in threads {
        assert_eq!(t.join().unwrap(), per_worker);
    }
    assert_eq!(next, vec![per_worker; workers as usize]);
    assert!(client.as_raw_fd() >= 0);
}
