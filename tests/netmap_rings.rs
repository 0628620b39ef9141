//! The netmap ring logic against in-memory rings laid out like netmap's.
#![cfg(feature = "netmap")]

use std::sync::atomic::Ordering;
use std::sync::Arc;

use netmap_sys::netmap::NS_BUF_CHANGED;
use usnetd::backend::netmap::memring::{MemRegion, MemRegionSpec, MemRing, TestSync};
use usnetd::backend::netmap::ring::{Forwarded, NetmapRx, NetmapTx};
use usnetd_shards::port::{FrameBatch, RxQueue, TxQueue, MAX_BATCH};

const BUF: u32 = 2048;

fn region(slots: &[u32], mem_id: u16) -> MemRegion {
    let total: u32 = slots.iter().sum();
    MemRegion::new(MemRegionSpec {
        ring_slots: slots.to_vec(),
        buf_size: BUF,
        num_bufs: 2 + total + 8,
        mem_id,
    })
    .unwrap()
}

fn frame(n: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| n.wrapping_add(i as u8)).collect()
}

/// Receives one batch and returns copies of the frames.
fn recv_copy<S: usnetd::backend::netmap::ring::RingSync>(rx: &mut NetmapRx<S>) -> Vec<Vec<u8>> {
    let mut batch = FrameBatch::new();
    rx.recv(&mut batch);
    batch.as_slice().iter().map(|f| f.to_vec()).collect()
}

/// A tx ring as the kernel hands it over after registration: all slots but one free.
fn free_tx(ring: &MemRing) {
    ring.set_head_cur(0);
    ring.set_tail(ring.num_slots() - 1);
}

#[test]
fn empty_ring_syncs_and_returns_nothing() {
    let mem = region(&[8], 1);
    let sync = TestSync::new();
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), sync.clone()).unwrap();
    assert!(recv_copy(&mut rx).is_empty());
    assert_eq!(sync.rxsyncs.load(Ordering::Relaxed), 1);
    assert_eq!(mem.ring(0).head(), 0);
}

#[test]
fn batch_receive_lends_and_gives_back_on_next_recv() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    let sync = TestSync::new();
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), sync.clone()).unwrap();
    for n in 0..3 {
        assert!(ring.push_rx(&frame(n, 60 + n as usize)));
    }
    let got = recv_copy(&mut rx);
    assert_eq!(got, vec![frame(0, 60), frame(1, 61), frame(2, 62)]);
    // Lent, not yet given back.
    assert_eq!((ring.head(), ring.cur()), (0, 0));
    // Frames were there, so no sync was needed.
    assert_eq!(sync.rxsyncs.load(Ordering::Relaxed), 0);
    assert!(recv_copy(&mut rx).is_empty());
    assert_eq!((ring.head(), ring.cur()), (3, 3));
    assert_eq!(rx.counters().frames, 3);
}

#[test]
fn rxsync_delivers_new_frames() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    let sync = TestSync::new();
    let kernel = ring.clone();
    sync.on_rxsync(move || {
        kernel.push_rx(&[7u8; 64]);
    });
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), sync.clone()).unwrap();
    assert_eq!(recv_copy(&mut rx), vec![vec![7u8; 64]]);
    assert_eq!(sync.rxsyncs.load(Ordering::Relaxed), 1);
}

#[test]
fn receive_wraps_around_and_caps_at_max_batch() {
    let slots = 128u32;
    let mem = region(&[slots], 1);
    let ring = mem.ring(0);
    // Start near the end of the ring.
    ring.set_head_cur(120);
    ring.set_tail(120);
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    for n in 0..100u8 {
        assert!(ring.push_rx(&frame(n, 64)));
    }
    assert_eq!(ring.tail(), (120 + 100) % slots);
    let first = recv_copy(&mut rx);
    assert_eq!(first.len(), MAX_BATCH);
    assert_eq!(first[0], frame(0, 64));
    assert_eq!(first[63], frame(63, 64));
    let second = recv_copy(&mut rx);
    assert_eq!(second.len(), 100 - MAX_BATCH);
    assert_eq!(second[0], frame(64, 64));
    assert_eq!(ring.head(), (120 + MAX_BATCH as u32) % slots);
    assert!(recv_copy(&mut rx).is_empty());
    assert_eq!(ring.head(), (120 + 100) % slots);
}

#[test]
fn full_rx_ring_is_drained() {
    let mem = region(&[16], 1);
    let ring = mem.ring(0);
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    let mut pushed = 0;
    while ring.push_rx(&frame(pushed, 70)) {
        pushed += 1;
    }
    assert_eq!(pushed, 15); // one slot always stays empty
    assert_eq!(recv_copy(&mut rx).len(), 15);
}

#[test]
fn transmit_copies_frames_and_returns_fewer_when_full() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    free_tx(&ring);
    let sync = TestSync::new();
    let mut tx = NetmapTx::new(mem.region(), mem.ring_off(0), sync.clone(), true).unwrap();
    let frames: Vec<Vec<u8>> = (0..10).map(|n| frame(n, 100 + n as usize)).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    assert_eq!(tx.send(&refs), 7, "7 free slots");
    assert_eq!(ring.head(), 7);
    assert_eq!(ring.cur(), 7);
    assert!(sync.txsyncs.load(Ordering::Relaxed) >= 1);
    // Full: nothing accepted until the kernel frees slots.
    assert_eq!(tx.send(&refs[7..]), 0);
    let sent = ring.drain_tx(0);
    assert_eq!(sent.len(), 7);
    for (i, (data, flags)) in sent.iter().enumerate() {
        assert_eq!(data, &frames[i]);
        assert_eq!(*flags, 0);
    }
    // Wraps around: slots 7, 0, 1.
    assert_eq!(tx.send(&refs[7..]), 3);
    assert_eq!(ring.head(), 2);
    let sent = ring.drain_tx(7);
    assert_eq!(
        sent.iter().map(|s| s.0.clone()).collect::<Vec<_>>(),
        frames[7..].to_vec()
    );
    assert_eq!(tx.counters().frames, 10);
}

#[test]
fn oversize_tx_frames_are_consumed_and_counted() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    free_tx(&ring);
    let mut tx = NetmapTx::new(mem.region(), mem.ring_off(0), TestSync::new(), true).unwrap();
    let big = vec![0u8; BUF as usize + 1];
    let ok = frame(1, 60);
    assert_eq!(tx.send(&[&big, &ok, &[]]), 3);
    assert_eq!(tx.counters().oversize, 2);
    assert_eq!(ring.head(), 1);
    assert_eq!(ring.drain_tx(0), vec![(ok, 0)]);
}

#[test]
fn corrupt_rx_slots_are_skipped_and_counted() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    for n in 0..5 {
        ring.push_rx(&frame(n, 64));
    }
    let (idx1, _, _) = ring.slot(1);
    ring.set_slot(1, u32::MAX, 64, 0); // index far out of the region
    ring.set_slot(2, ring.slot(2).0, BUF as u16 + 1, 0); // longer than a buffer
    ring.set_slot(3, ring.slot(3).0, 0, 0); // empty
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    assert_eq!(recv_copy(&mut rx), vec![frame(0, 64), frame(4, 64)]);
    assert_eq!(rx.counters().corrupt_slots, 3);
    // The corrupt slots are given back like the others.
    recv_copy(&mut rx);
    assert_eq!(ring.head(), 5);
    let _ = idx1;
}

#[test]
fn bad_tail_moves_nothing() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    ring.push_rx(&frame(0, 64));
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    let mut tx = NetmapTx::new(mem.region(), mem.ring_off(0), TestSync::new(), true).unwrap();
    ring.set_tail(1000);
    assert!(recv_copy(&mut rx).is_empty());
    assert_eq!(rx.counters().bad_ring_state, 1);
    assert_eq!(ring.head(), 0);
    // A hostile num_slots in shared memory is ignored (geometry was read at attach).
    ring.set_num_slots_raw(u32::MAX);
    ring.set_tail(1);
    assert_eq!(recv_copy(&mut rx), vec![frame(0, 64)]);

    ring.set_tail(9999);
    assert_eq!(tx.send(&[&frame(0, 60)]), 0);
    assert!(tx.counters().bad_ring_state >= 1);
}

#[test]
fn corrupt_tx_slot_is_consumed_empty() {
    let mem = region(&[8], 1);
    let ring = mem.ring(0);
    free_tx(&ring);
    ring.set_slot(0, 1 << 30, 0, 0);
    let mut tx = NetmapTx::new(mem.region(), mem.ring_off(0), TestSync::new(), true).unwrap();
    let (a, b) = (frame(1, 60), frame(2, 60));
    assert_eq!(tx.send(&[&a, &b]), 2);
    assert_eq!(tx.counters().corrupt_slots, 1);
    let sent = ring.drain_tx(0);
    assert_eq!(sent[0].0.len(), 0, "the corrupt slot goes out empty");
    assert_eq!(sent[1].0, b);
}

#[test]
fn bad_geometry_is_refused() {
    let mem = region(&[8], 1);
    // Not a ring: offset inside the slots, misaligned, out of range.
    assert!(NetmapRx::new(mem.region(), mem.ring_off(0) + 4, TestSync::new()).is_err());
    assert!(NetmapRx::new(mem.region(), mem.region().len(), TestSync::new()).is_err());
    mem.ring(0).set_tail(8);
    assert!(NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).is_err());
}

/// rx ring 0 and tx ring 1 in one region.
fn rx_tx_pair(
    mem: &MemRegion,
    zero_copy: bool,
) -> (NetmapRx<Arc<TestSync>>, NetmapTx<Arc<TestSync>>) {
    free_tx(&mem.ring(1));
    let rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    let tx = NetmapTx::new(mem.region(), mem.ring_off(1), TestSync::new(), zero_copy).unwrap();
    (rx, tx)
}

#[test]
fn zero_copy_swaps_buffer_indices() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    rxr.push_rx(&frame(9, 90));
    rxr.push_rx(&frame(8, 80));
    let (rx_idx, _, _) = rxr.slot(0);
    let (tx_idx, _, _) = txr.slot(0);
    assert_eq!(recv_copy(&mut rx).len(), 2);
    assert_eq!(rx.forward_lent(0, &mut tx), Forwarded::Swapped);
    // Buffer indices swapped, both slots flagged.
    assert_eq!(txr.slot(0), (rx_idx, 90, NS_BUF_CHANGED));
    assert_eq!(rxr.slot(0).0, tx_idx);
    assert_eq!(rxr.slot(0).2 & NS_BUF_CHANGED, NS_BUF_CHANGED);
    assert_eq!(txr.head(), 1);
    // The payload is visible on the tx side without a copy.
    assert_eq!(txr.buf(txr.slot(0).0, 90), frame(9, 90));
    // Forwarding the same frame twice is refused.
    assert_eq!(rx.forward_lent(0, &mut tx), Forwarded::NotLent);
    assert_eq!(rx.forward_lent(5, &mut tx), Forwarded::NotLent);
    assert_eq!(rx.counters().swapped, 1);
    // The rx slot goes back to the kernel with its new buffer.
    recv_copy(&mut rx);
    assert_eq!(rxr.head(), 2);
}

#[test]
fn no_zero_copy_copies() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, false);
    rxr.push_rx(&frame(3, 64));
    let before = (rxr.slot(0).0, txr.slot(0).0);
    recv_copy(&mut rx);
    assert_eq!(rx.forward_lent(0, &mut tx), Forwarded::Copied);
    assert_eq!((rxr.slot(0).0, txr.slot(0).0), before, "no swap");
    assert_eq!(txr.slot(0).2 & NS_BUF_CHANGED, 0);
    assert_eq!(txr.drain_tx(0), vec![(frame(3, 64), 0)]);
    assert_eq!(rx.counters().copied, 1);
}

#[test]
fn different_regions_copy() {
    let a = region(&[8], 1);
    let b = region(&[8], 2);
    let (rxr, txr) = (a.ring(0), b.ring(0));
    free_tx(&txr);
    let mut rx = NetmapRx::new(a.region(), a.ring_off(0), TestSync::new()).unwrap();
    let mut tx = NetmapTx::new(b.region(), b.ring_off(0), TestSync::new(), true).unwrap();
    rxr.push_rx(&frame(5, 200));
    let rx_idx = rxr.slot(0).0;
    recv_copy(&mut rx);
    assert_eq!(rx.forward_lent(0, &mut tx), Forwarded::Copied);
    assert_eq!(rxr.slot(0).0, rx_idx);
    assert_eq!(txr.drain_tx(0), vec![(frame(5, 200), 0)]);
}

#[test]
fn forward_into_full_ring_keeps_frame_lent() {
    let mem = region(&[8, 4], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    for n in 0..5 {
        rxr.push_rx(&frame(n, 64));
    }
    recv_copy(&mut rx);
    for i in 0..3 {
        assert_eq!(rx.forward_lent(i, &mut tx), Forwarded::Swapped);
    }
    assert_eq!(rx.forward_lent(3, &mut tx), Forwarded::NoSpace);
    txr.drain_tx(0);
    assert_eq!(rx.forward_lent(3, &mut tx), Forwarded::Swapped);
    tx.flush();
}

#[test]
fn corrupt_tx_buffer_falls_back_and_is_counted() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    rxr.push_rx(&frame(1, 64));
    txr.set_slot(0, u32::MAX - 1, 0, 0);
    let rx_idx = rxr.slot(0).0;
    recv_copy(&mut rx);
    // Swapping would hand the corrupt index to the rx ring: refused, copy fails, counted.
    assert_eq!(rx.forward_lent(0, &mut tx), Forwarded::Dropped);
    assert_eq!(rxr.slot(0).0, rx_idx);
    assert_eq!(tx.counters().corrupt_slots, 1);
}

#[test]
fn failing_sync_is_counted() {
    let mem = region(&[8], 1);
    let sync = TestSync::new();
    sync.fail.store(true, Ordering::Relaxed);
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), sync).unwrap();
    assert!(recv_copy(&mut rx).is_empty());
    assert_eq!(rx.counters().sync_errors, 1);
}

// Zero copy on the data-plane path: `TxQueue::send` / `EndpointSink::deliver` recognize a
// frame lent by an rx ring of the same region by its address and swap buffers.

/// Receives one batch and sends all its frames through `send` (as the worker does).
fn recv_and_send<S: usnetd::backend::netmap::ring::RingSync>(
    rx: &mut NetmapRx<S>,
    send: &mut dyn FnMut(&[&[u8]]) -> usize,
) -> usize {
    let mut batch = FrameBatch::new();
    rx.recv(&mut batch);
    send(batch.as_slice())
}

#[test]
fn send_of_lent_frame_swaps_buffers() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    rxr.push_rx(&frame(9, 90));
    rxr.push_rx(&frame(8, 80));
    let rx_bufs = (rxr.slot(0).0, rxr.slot(1).0);
    let tx_bufs = (txr.slot(0).0, txr.slot(1).0);
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 2);
    // The tx slots hold the rx buffers, flagged; the payload was not copied.
    assert_eq!(txr.slot(0), (rx_bufs.0, 90, NS_BUF_CHANGED));
    assert_eq!(txr.slot(1), (rx_bufs.1, 80, NS_BUF_CHANGED));
    assert_eq!(
        txr.buf(tx_bufs.0, 90),
        vec![0u8; 90],
        "old tx buffer untouched"
    );
    assert_eq!(tx.counters().swapped, 2);
    assert_eq!(tx.counters().copied, 0);
    // The rx slots still hold their (lent) buffers until the next recv...
    assert_eq!(rxr.slot(0).0, rx_bufs.0);
    // ...which gives them back with the tx slots' old buffers.
    assert!(recv_copy(&mut rx).is_empty());
    assert_eq!(rxr.slot(0).0, tx_bufs.0);
    assert_eq!(rxr.slot(1).0, tx_bufs.1);
    assert_eq!(rxr.slot(0).2 & NS_BUF_CHANGED, NS_BUF_CHANGED);
    assert_eq!(rxr.slot(1).2 & NS_BUF_CHANGED, NS_BUF_CHANGED);
    assert_eq!((rxr.head(), rxr.cur()), (2, 2));
    assert_eq!(rx.counters().swapped, 2);
    // The kernel sends the frames intact.
    assert_eq!(
        txr.drain_tx(0),
        vec![
            (frame(9, 90), NS_BUF_CHANGED),
            (frame(8, 80), NS_BUF_CHANGED)
        ]
    );
    // Settled: the next batch swaps again (the ledger is empty), through the new buffers.
    rxr.push_rx(&frame(1, 70));
    let lent = rxr.slot(2).0;
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 1);
    assert_eq!(txr.slot(2), (lent, 70, NS_BUF_CHANGED));
    recv_copy(&mut rx);
    assert_eq!(rx.counters().swapped, 3);
}

#[test]
fn send_with_zero_copy_off_copies() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, false);
    rxr.push_rx(&frame(3, 64));
    let before = (rxr.slot(0).0, txr.slot(0).0);
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 1);
    recv_copy(&mut rx);
    assert_eq!((rxr.slot(0).0, txr.slot(0).0), before, "no swap");
    assert_eq!(rxr.slot(0).2 & NS_BUF_CHANGED, 0);
    assert_eq!(txr.drain_tx(0), vec![(frame(3, 64), 0)]);
    assert_eq!((tx.counters().swapped, tx.counters().copied), (0, 1));
    assert_eq!(rx.counters().swapped, 0);
}

#[test]
fn send_between_regions_copies() {
    // Same allocator id, but another mapping: not recognized by address, copied.
    let a = region(&[8], 1);
    let b = region(&[8], 1);
    let (rxr, txr) = (a.ring(0), b.ring(0));
    free_tx(&txr);
    let mut rx = NetmapRx::new(a.region(), a.ring_off(0), TestSync::new()).unwrap();
    let mut tx = NetmapTx::new(b.region(), b.ring_off(0), TestSync::new(), true).unwrap();
    rxr.push_rx(&frame(5, 200));
    let before = (rxr.slot(0).0, txr.slot(0).0);
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 1);
    recv_copy(&mut rx);
    assert_eq!((rxr.slot(0).0, txr.slot(0).0), before);
    assert_eq!(txr.drain_tx(0), vec![(frame(5, 200), 0)]);
    assert_eq!((tx.counters().swapped, tx.counters().copied), (0, 1));
}

#[test]
fn slices_not_on_a_buffer_start_are_copied() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    rxr.push_rx(&frame(4, 100));
    let mut batch = FrameBatch::new();
    rx.recv(&mut batch);
    let lent = batch.as_slice()[0];
    // Inside a buffer (not at its start): copied.
    assert_eq!(tx.send(&[&lent[14..]]), 1);
    assert_eq!(txr.drain_tx(0), vec![(frame(4, 100)[14..].to_vec(), 0)]);
    assert_eq!((tx.counters().swapped, tx.counters().copied), (0, 1));
}

#[test]
fn frame_sent_twice_is_swapped_once_and_copied_once() {
    let mem = region(&[8, 8, 8], 1);
    let (rxr, txr, txr2) = (mem.ring(0), mem.ring(1), mem.ring(2));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    free_tx(&txr2);
    let mut tx2 = NetmapTx::new(mem.region(), mem.ring_off(2), TestSync::new(), true).unwrap();
    rxr.push_rx(&frame(6, 60));
    let (rx_buf, tx_buf, tx2_buf) = (rxr.slot(0).0, txr.slot(0).0, txr2.slot(0).0);
    let mut batch = FrameBatch::new();
    rx.recv(&mut batch);
    // Delivered to two endpoints (an ARP broadcast), and once more to the first.
    assert_eq!(tx.send(batch.as_slice()), 1);
    assert_eq!(tx2.send(batch.as_slice()), 1);
    assert_eq!(tx.send(batch.as_slice()), 1);
    assert_eq!(txr.slot(0), (rx_buf, 60, NS_BUF_CHANGED));
    assert_eq!(txr2.slot(0), (tx2_buf, 60, 0), "copied into its own buffer");
    assert_eq!(txr.slot(1).2, 0, "copied");
    assert_eq!((tx.counters().swapped, tx.counters().copied), (1, 1));
    assert_eq!((tx2.counters().swapped, tx2.counters().copied), (0, 1));
    recv_copy(&mut rx);
    assert_eq!(rxr.slot(0).0, tx_buf);
    assert_eq!(rx.counters().swapped, 1);
    assert_eq!(
        txr.drain_tx(0),
        vec![(frame(6, 60), NS_BUF_CHANGED), (frame(6, 60), 0)]
    );
    assert_eq!(txr2.drain_tx(0), vec![(frame(6, 60), 0)]);
}

#[test]
fn pipe_sink_swaps_through_deliver() {
    use usnetd::backend::netmap::ring::SharedTx;
    use usnetd_shards::endpoint::EndpointSink;
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, tx) = rx_tx_pair(&mem, true);
    let sink = SharedTx::new(tx);
    rxr.push_rx(&frame(2, 120));
    let (rx_buf, tx_buf) = (rxr.slot(0).0, txr.slot(0).0);
    assert_eq!(recv_and_send(&mut rx, &mut |f| sink.deliver(0, f)), 1);
    assert_eq!(txr.slot(0), (rx_buf, 120, NS_BUF_CHANGED));
    recv_copy(&mut rx);
    assert_eq!(rxr.slot(0), (tx_buf, 0, NS_BUF_CHANGED));
    assert_eq!(sink.0.lock().unwrap().counters().swapped, 1);
    assert_eq!(txr.drain_tx(0), vec![(frame(2, 120), NS_BUF_CHANGED)]);
}

#[test]
fn pipe_sink_with_zero_copy_off_copies() {
    use usnetd::backend::netmap::ring::SharedTx;
    use usnetd_shards::endpoint::EndpointSink;
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, tx) = rx_tx_pair(&mem, false);
    let sink = SharedTx::new(tx);
    rxr.push_rx(&frame(2, 120));
    let before = (rxr.slot(0).0, txr.slot(0).0);
    assert_eq!(recv_and_send(&mut rx, &mut |f| sink.deliver(0, f)), 1);
    recv_copy(&mut rx);
    assert_eq!((rxr.slot(0).0, txr.slot(0).0), before);
    assert_eq!(sink.0.lock().unwrap().counters().copied, 1);
    assert_eq!(txr.drain_tx(0), vec![(frame(2, 120), 0)]);
}

#[test]
fn tx_slot_holding_a_still_lent_buffer_is_not_reused() {
    // A 4-slot tx ring (3 usable) goes round within one rx batch of 5 frames.
    let mem = region(&[8, 4], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    for n in 0..5 {
        rxr.push_rx(&frame(n, 64));
    }
    let mut batch = FrameBatch::new();
    rx.recv(&mut batch);
    let frames = batch.as_slice();
    assert_eq!(tx.send(&frames[..3]), 3);
    let taken0 = txr.slot(0).0;
    // The kernel sends them and frees every slot: slot 3 is free, slot 0 would be next.
    assert_eq!(txr.drain_tx(0).len(), 3);
    assert_eq!(
        tx.send(&frames[3..4]),
        1,
        "slot 3 holds the tx ring's own buffer"
    );
    // Slot 0 still holds a buffer lent by the rx ring: the ring counts as full.
    assert_eq!(tx.send(&frames[4..]), 0);
    assert_eq!(txr.slot(0).0, taken0);
    assert_eq!(
        rxr.buf(taken0, 64),
        frame(0, 64),
        "lent frame not overwritten"
    );
    // Once the rx ring settled its swaps, the slot is usable again.
    txr.drain_tx(3);
    recv_copy(&mut rx);
    assert_eq!(rx.counters().swapped, 4);
    rxr.push_rx(&frame(7, 64));
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 1);
    assert_eq!(txr.slot(0).2, NS_BUF_CHANGED);
    assert_eq!(txr.drain_tx(0), vec![(frame(7, 64), NS_BUF_CHANGED)]);
}

#[test]
fn dropping_an_rx_ring_settles_its_swaps() {
    let mem = region(&[8, 8], 1);
    let (rxr, txr) = (mem.ring(0), mem.ring(1));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    rxr.push_rx(&frame(1, 64));
    let tx_buf = txr.slot(0).0;
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 1);
    drop(rx);
    assert_eq!(rxr.slot(0), (tx_buf, 0, NS_BUF_CHANGED));
    assert_eq!(rxr.head(), 1);
    // The ledger is empty again: a new rx ring's frames swap.
    let mut rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    rxr.push_rx(&frame(2, 64));
    assert_eq!(recv_and_send(&mut rx, &mut |f| tx.send(f)), 1);
    assert_eq!(tx.counters().swapped, 2);
}

#[test]
fn forward_lent_does_not_move_a_taken_buffer() {
    let mem = region(&[8, 8, 8], 1);
    let (rxr, txr, txr2) = (mem.ring(0), mem.ring(1), mem.ring(2));
    let (mut rx, mut tx) = rx_tx_pair(&mem, true);
    free_tx(&txr2);
    let mut tx2 = NetmapTx::new(mem.region(), mem.ring_off(2), TestSync::new(), true).unwrap();
    rxr.push_rx(&frame(3, 64));
    let rx_buf = rxr.slot(0).0;
    let mut batch = FrameBatch::new();
    rx.recv(&mut batch);
    assert_eq!(tx.send(batch.as_slice()), 1);
    assert_eq!(txr.slot(0).0, rx_buf);
    assert_eq!(rx.forward_lent(0, &mut tx2), Forwarded::Copied);
    assert_eq!(txr2.slot(0).2, 0);
    assert_eq!(txr2.drain_tx(0), vec![(frame(3, 64), 0)]);
}

#[test]
fn rings_with_other_buffer_geometry_are_refused() {
    let mem = region(&[8, 8], 1);
    let _rx = NetmapRx::new(mem.region(), mem.ring_off(0), TestSync::new()).unwrap();
    // A peer rewrote ring 1's buf_ofs before it was attached.
    mem.ring(1).set_buf_ofs_raw(0);
    assert!(NetmapTx::new(mem.region(), mem.ring_off(1), TestSync::new(), true).is_err());
}
