//! Channel throughput: 60-byte frames delivered by one switch worker in batches of 32 over the
//! Unix-datagram channel and over the shared-memory channel, with a client thread draining.
//!
//! Prints frames/s (as received by the client) and the switch side's CPU time per accepted
//! frame (user + system time of the producer thread, `getrusage(RUSAGE_THREAD)`).
//!
//! `cargo run --release --example channel_bench [seconds per run]`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use usnetd::channel::shm::ShmChannel;
use usnetd::channel::uds::UdsChannel;
use usnetd_client::channel::{PacketChannel, UdsChannel as ClientUds};
use usnetd_client::shm::ShmClient;
use usnetd_shards::endpoint::EndpointSink;

const BATCH: usize = 32;
const FRAME: usize = 60;

struct Result {
    name: &'static str,
    received: u64,
    accepted: u64,
    refused: u64,
    wall: Duration,
    producer_cpu: Duration,
}

fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills a zeroed local struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a live rusage.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Runs `sink` against a consumer `drain` (returns frames read, 0 when none) for `secs`.
fn run(
    name: &'static str,
    sink: Arc<dyn EndpointSink>,
    mut drain: impl FnMut() -> u64 + Send + 'static,
    secs: f64,
) -> Result {
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_stop = stop.clone();
    let consumer = std::thread::spawn(move || {
        let mut received = 0u64;
        loop {
            let n = drain();
            received += n;
            if n == 0 && consumer_stop.load(Ordering::Relaxed) {
                // Drain what is left, then stop.
                let mut idle = 0;
                while idle < 1000 {
                    let n = drain();
                    received += n;
                    idle = if n == 0 { idle + 1 } else { 0 };
                }
                return received;
            }
        }
    });
    let frames: Vec<Vec<u8>> = (0..BATCH).map(|i| vec![i as u8; FRAME]).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_slice()).collect();
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let (mut accepted, mut refused) = (0u64, 0u64);
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        for _ in 0..64 {
            let n = sink.deliver(0, &refs);
            accepted += n as u64;
            refused += (BATCH - n) as u64;
            if n < BATCH {
                std::thread::yield_now();
            }
        }
    }
    let producer_cpu = thread_cpu() - cpu0;
    stop.store(true, Ordering::Relaxed);
    let received = consumer.join().expect("consumer");
    let wall = start.elapsed();
    Result {
        name,
        received,
        accepted,
        refused,
        wall,
        producer_cpu,
    }
}

fn main() -> std::io::Result<()> {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let mut results = Vec::new();

    let (client_fd, sink, _source) = UdsChannel::pair(1500)?;
    let mut client = ClientUds::new(client_fd);
    let mut buf = vec![0u8; 1514];
    results.push(run(
        "uds (sendmmsg)",
        Arc::new(sink),
        move || {
            let mut n = 0;
            while let Ok(Some(_)) = client.recv(&mut buf) {
                n += 1;
            }
            n
        },
        secs,
    ));

    let (handover, sink, _source) = ShmChannel::create(1, 1024, 2048)?;
    let mut client = ShmClient::from_fds(
        handover.memfd,
        [handover.to_client_event, handover.to_switch_event],
    )?;
    results.push(run(
        "shm rings",
        Arc::new(sink),
        move || {
            let mut n = 0u64;
            client.recv_batch(|f| {
                std::hint::black_box(f);
                n += 1;
            });
            n
        },
        secs,
    ));

    println!(
        "{:<16} {:>12} {:>14} {:>12} {:>16}",
        "channel", "frames/s", "accepted", "refused", "switch ns/frame"
    );
    for r in &results {
        println!(
            "{:<16} {:>12.0} {:>14} {:>12} {:>16.1}",
            r.name,
            r.received as f64 / r.wall.as_secs_f64(),
            r.accepted,
            r.refused,
            r.producer_cpu.as_nanos() as f64 / r.accepted.max(1) as f64,
        );
    }
    println!(
        "({FRAME}-byte frames, batches of {BATCH}, one producer and one draining consumer thread)"
    );
    Ok(())
}
