//! Publish latency of single rule changes while reader threads look up keys.
//!
//! `cargo run --release -p usnetd-shards --example publish_latency -- [rules] [changes] [readers]`
//! (defaults: 1000000 rules, 200000 changes, 1 reader). Each change learns a new connection
//! rule or removes an old one (alternately) and publishes; the time of change + publish is
//! recorded. Prints p50/p90/p99/p99.9/max and the readers' lookup rate.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usnetd_shards::endpoint::{EndpointKind, EndpointSink};
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::table::Table;

struct NoSink;
impl EndpointSink for NoSink {
    fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
        frames.len()
    }
}

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

fn arg(n: usize, default: usize) -> usize {
    std::env::args()
        .nth(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rules = arg(1, 1_000_000);
    let changes = arg(2, 200_000);
    let readers = arg(3, 1);

    let mut table = Table::new();
    let ep = table.add_endpoint(EndpointKind::Kernel, "kernel".into(), Arc::new(NoSink));
    let t0 = Instant::now();
    for i in 0..rules as u32 {
        table.learn(conn(i), ep);
    }
    table.merge_now();
    table.publish();
    println!("built {rules} rules in {:?}", t0.elapsed());

    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..readers)
        .map(|r| {
            let reader = table.reader();
            let (stop, lookups) = (stop.clone(), lookups.clone());
            std::thread::spawn(move || {
                let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ r as u64;
                let mut keys = [FlowKey::default(); 64];
                let mut out = [None; 64];
                let (mut n, mut hits) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    for k in &mut keys {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        *k = conn((s % rules as u64) as u32);
                    }
                    reader.load().lookup_batch(&keys, &mut out);
                    hits += out.iter().filter(|o| o.is_some()).count() as u64;
                    n += 64;
                }
                lookups.fetch_add(n, Ordering::Relaxed);
                hits
            })
        })
        .collect();

    let reader = table.reader();
    let mut times = Vec::with_capacity(changes);
    let start = Instant::now();
    let mut max_delta = 0;
    for i in 0..changes as u32 {
        let t = Instant::now();
        if i.is_multiple_of(2) {
            table.learn(conn(rules as u32 + i / 2), ep);
        } else {
            table.remove_rule(&conn(i / 2), None).unwrap();
        }
        table.publish();
        times.push(t.elapsed());
        max_delta = max_delta.max(table.delta_len());
    }
    let elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(reader.load().rule_count(), table.rule_count());

    times.sort();
    let pct = |p: f64| times[((times.len() - 1) as f64 * p) as usize];
    let show = |d: Duration| format!("{:.2} us", d.as_secs_f64() * 1e6);
    println!(
        "{changes} changes into {rules} rules, {readers} reader thread(s): p50 {} p90 {} p99 {} p99.9 {} max {} (max delta {max_delta} keys)",
        show(pct(0.5)),
        show(pct(0.9)),
        show(pct(0.99)),
        show(pct(0.999)),
        show(*times.last().unwrap()),
    );
    println!(
        "readers: {:.1} M lookups/s in total while publishing",
        lookups.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64() / 1e6
    );
}
