//! Rule table benchmarks: publishing one rule change, and looking up keys (single and batch,
//! hits and misses) in tables of 10,000 and 1,000,000 connection rules.
//!
//! `cargo bench -p usnetd-shards --bench table`

use std::cell::Cell;
use std::sync::Arc;

use divan::counter::ItemsCount;
use divan::Bencher;
use usnetd_shards::endpoint::{EndpointId, EndpointKind, EndpointSink};
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::snapshot::{Origin, Snapshot};
use usnetd_shards::table::Table;

fn main() {
    divan::main();
}

const SIZES: &[usize] = &[10_000, 1_000_000];
const BATCH: usize = 64;

struct NoSink;
impl EndpointSink for NoSink {
    fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
        frames.len()
    }
}

/// Connection `i`: 192.0.2.2:443 <- 10.x.y.z:port (distinct for every i).
fn conn(i: u32) -> FlowKey {
    let b = i.to_be_bytes();
    FlowKey {
        local_ip: Ip::v4([192, 0, 2, 2]),
        remote_ip: Ip::v4([10, b[1], b[2], b[3]]),
        local_port: 443,
        remote_port: 1024 + (u32::from(b[0]) * 7 + i % 3) as u16,
        proto: proto::TCP,
    }
}

/// A key no rule matches (another local port, no listening rule).
fn miss(i: u32) -> FlowKey {
    FlowKey {
        local_port: 8443,
        ..conn(i)
    }
}

fn table(n: usize) -> (Table, EndpointId) {
    let mut t = Table::new();
    let ep = t.add_endpoint(EndpointKind::Kernel, "kernel".into(), Arc::new(NoSink));
    for port in [22, 80] {
        t.add_rule(
            FlowKey {
                local_ip: Ip::v4([192, 0, 2, 2]),
                local_port: port,
                proto: proto::TCP,
                ..FlowKey::default()
            },
            ep,
            Origin::Static,
        )
        .unwrap();
    }
    for i in 0..n as u32 {
        assert!(t.learn(conn(i), ep));
    }
    t.merge_now();
    t.publish();
    (t, ep)
}

/// Keys in a random order (xorshift), so that consecutive lookups hit unrelated slots.
fn shuffled(n: usize, f: fn(u32) -> FlowKey) -> Vec<FlowKey> {
    let mut keys: Vec<FlowKey> = (0..n as u32).map(f).collect();
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for i in (1..keys.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        keys.swap(i, (s % (i as u64 + 1)) as usize);
    }
    keys
}

fn snapshot(n: usize) -> Arc<Snapshot> {
    table(n).0.reader().load_full()
}

/// One rule change, then published, while the table holds `n` rules: alternately a new
/// rule is learned and an old one removed, so the delta grows and background merges run.
#[divan::bench(args = SIZES, sample_count = 200, sample_size = 50)]
fn publish_one_change(bencher: Bencher, n: usize) {
    let (mut t, ep) = table(n);
    let reader = t.reader();
    let next = Cell::new(0u32);
    bencher.bench_local(|| {
        let i = next.get();
        next.set(i + 1);
        if i.is_multiple_of(2) {
            t.learn(conn(n as u32 + i / 2), ep);
        } else {
            t.remove_rule(&conn(i / 2), None).unwrap();
        }
        t.publish();
        divan::black_box(reader.load().generation());
    });
}

fn lookup_single(bencher: Bencher, n: usize, f: fn(u32) -> FlowKey) {
    let snap = snapshot(n);
    let keys = shuffled(n, f);
    let next = Cell::new(0usize);
    bencher.counter(ItemsCount::new(1usize)).bench_local(|| {
        let i = next.get();
        next.set(if i + 1 == keys.len() { 0 } else { i + 1 });
        snap.lookup(divan::black_box(&keys[i]))
    });
}

fn lookup_batch(bencher: Bencher, n: usize, f: fn(u32) -> FlowKey) {
    let snap = snapshot(n);
    let keys = shuffled(n, f);
    let mut out = [None; BATCH];
    let next = Cell::new(0usize);
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        let i = next.get();
        next.set(if i + 2 * BATCH > keys.len() {
            0
        } else {
            i + BATCH
        });
        snap.lookup_batch(divan::black_box(&keys[i..i + BATCH]), &mut out);
        divan::black_box(&out);
    });
}

/// One connection-rule hit.
#[divan::bench(args = SIZES)]
fn lookup_hit(bencher: Bencher, n: usize) {
    lookup_single(bencher, n, conn);
}

/// A key no rule matches (exact and listening probes both miss).
#[divan::bench(args = SIZES)]
fn lookup_miss(bencher: Bencher, n: usize) {
    lookup_single(bencher, n, miss);
}

/// 64 connection-rule hits per call (time per call; throughput per key).
#[divan::bench(args = SIZES)]
fn lookup_batch_hit(bencher: Bencher, n: usize) {
    lookup_batch(bencher, n, conn);
}

/// 64 misses per call.
#[divan::bench(args = SIZES)]
fn lookup_batch_miss(bencher: Bencher, n: usize) {
    lookup_batch(bencher, n, miss);
}

/// 64 hits per call with 5,000 unmerged changes in the delta layer.
#[divan::bench(args = SIZES)]
fn lookup_batch_hit_with_delta(bencher: Bencher, n: usize) {
    let (mut t, ep) = table(n);
    for i in 0..5000 {
        t.learn(conn(n as u32 + i), ep);
        t.remove_rule(&conn(i), None).unwrap();
        t.learn(conn(i), ep);
    }
    // This snapshot keeps its delta even if the publish starts a background merge.
    t.publish();
    let snap = t.reader().load_full();
    let keys = shuffled(n, conn);
    let mut out = [None; BATCH];
    let next = Cell::new(0usize);
    bencher.counter(ItemsCount::new(BATCH)).bench_local(|| {
        let i = next.get();
        next.set(if i + 2 * BATCH > keys.len() {
            0
        } else {
            i + BATCH
        });
        snap.lookup_batch(divan::black_box(&keys[i..i + BATCH]), &mut out);
        divan::black_box(&out);
    });
}
