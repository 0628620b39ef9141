//! Per-frame cost of the data plane's inner step: classify a frame and look its key up in a
//! rule snapshot, at 10k and 1M rules (one flow per rule, frames in random order so large
//! tables miss the cache like real traffic does).
//!
//! Run: `cargo bench -p usnetd-shards --bench dataplane`

use std::sync::Arc;

use divan::{black_box, counter::ItemsCount, Bencher};
use std::sync::Mutex;

use usnetd_shards::counters::WorkerCounters;
use usnetd_shards::endpoint::{EndpointId, EndpointKind};
use usnetd_shards::frame::classify;
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::memport::frames::Ipv4Frame;
use usnetd_shards::memport::{FrameSet, LoopRx, MemSink, MemTx, WhenFull};
use usnetd_shards::port::MAX_BATCH;
use usnetd_shards::snapshot::{Origin, Snapshot};
use usnetd_shards::table::Table;
use usnetd_shards::worker::{NicShared, Worker, WorkerParts};

fn main() {
    divan::main();
}

const LOCAL: [u8; 4] = [10, 0, 0, 2];

/// The connection rule number `i` (unique by remote address).
fn rule_key(i: usize) -> FlowKey {
    let r = 0x6440_0000u32 + i as u32; // 100.64.0.0/10
    FlowKey {
        local_ip: Ip::v4(LOCAL),
        remote_ip: Ip::v4(r.to_be_bytes()),
        local_port: 20_000 + (i % 40_000) as u16,
        remote_port: 1024 + ((i * 7) % 60_000) as u16,
        proto: if i.is_multiple_of(2) {
            proto::TCP
        } else {
            proto::UDP
        },
    }
}

fn frame_for(key: &FlowKey) -> Vec<u8> {
    let ip = |k: Ip| [k.0[12], k.0[13], k.0[14], k.0[15]];
    Ipv4Frame {
        src_ip: ip(key.remote_ip),
        dst_ip: ip(key.local_ip),
        proto: key.proto,
        src_port: key.remote_port,
        dst_port: key.local_port,
        ..Ipv4Frame::default()
    }
    .build()
}

/// A snapshot with `rules` connection rules over 16 endpoints, and one frame per rule in a
/// pseudo-random order.
fn workload(rules: usize) -> (Arc<Snapshot>, FrameSet) {
    let (table, frames) = workload_table(rules, || MemSink::new(1, 1, 64, WhenFull::Refuse));
    let snap = table.reader().load_full();
    (snap, frames)
}

/// The table behind [`workload`], with endpoint channels made by `sink`.
fn workload_table(rules: usize, sink: impl Fn() -> MemSink) -> (Table, FrameSet) {
    let mut table = Table::new();
    let eps: Vec<EndpointId> = (0..16)
        .map(|i| {
            let sink = Arc::new(sink());
            table.add_endpoint(EndpointKind::Client, format!("client {i}"), sink)
        })
        .collect();
    for i in 0..rules {
        table
            .add_rule(rule_key(i), eps[i % eps.len()], Origin::Client)
            .expect("unique keys");
    }
    table.publish();
    // multiplicative permutation of 0..rules (odd multiplier coprime to most sizes; fall
    // back to identity order where it is not)
    let mult = 2_654_435_761usize % rules.max(1);
    let step = if gcd(mult, rules) == 1 { mult } else { 1 };
    let frames = (0..rules)
        .map(|i| frame_for(&rule_key((i * step) % rules)))
        .collect::<Vec<_>>();
    (table, frames.iter().map(|f| &f[..]).collect())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One frame per iteration: classify, then `Snapshot::lookup`.
#[divan::bench(args = [10_000, 1_000_000], sample_count = 100, sample_size = 2000)]
fn classify_lookup(bencher: Bencher, rules: usize) {
    let (snap, frames) = workload(rules);
    let mut next = 0;
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let f = frames.get(next);
        next += 1;
        if next == frames.len() {
            next = 0;
        }
        let key = classify(black_box(f)).expect("valid frame").incoming_key();
        black_box(snap.lookup(&key))
    });
}

/// A batch of 64 frames per iteration: classify all, then `Snapshot::lookup_batch` (what the
/// worker does). Counted per frame.
#[divan::bench(args = [10_000, 1_000_000], sample_count = 100, sample_size = 50)]
fn classify_lookup_batch(bencher: Bencher, rules: usize) {
    let (snap, frames) = workload(rules);
    let mut next = 0;
    let mut keys = [FlowKey::default(); MAX_BATCH];
    let mut found = [None; MAX_BATCH];
    bencher.counter(ItemsCount::new(MAX_BATCH)).bench_local(|| {
        for key in keys.iter_mut() {
            *key = classify(black_box(frames.get(next)))
                .expect("valid frame")
                .incoming_key();
            next += 1;
            if next == frames.len() {
                next = 0;
            }
        }
        snap.lookup_batch(&keys, &mut found);
        black_box(&found);
    });
}

/// The whole incoming path of one worker per frame: `Worker::poll_once` over an in-memory
/// NIC queue (batches of 64), delivering into copying 256-slot rings of 2048-byte slots.
#[divan::bench(args = [10_000, 1_000_000], sample_count = 100, sample_size = 50)]
fn worker_incoming(bencher: Bencher, rules: usize) {
    let (table, frames) = workload_table(rules, || {
        MemSink::new(1, 256, 2048, WhenFull::ConsumeOldest)
    });
    let (_commands, command_rx) = crossbeam_channel::unbounded();
    let mut worker = Worker::new(WorkerParts {
        id: 0,
        nic_rx: vec![Box::new(LoopRx::new(Arc::new(frames), 0))],
        nic_tx: Box::new(MemTx::counting().0),
        table: Arc::new(Mutex::new(table)),
        nic: Arc::new(NicShared::new()),
        counters: Arc::new(WorkerCounters::new()),
        commands: command_rx,
    });
    bencher
        .counter(ItemsCount::new(MAX_BATCH))
        .bench_local(|| black_box(worker.poll_once(0)));
}
