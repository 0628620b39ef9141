//! `usnetd-bench channel`: the switch-to-client packet channels themselves, without a NIC or a
//! generator in front of them.
//!
//! For each `--kind` (the Unix datagram channel, `uds`, and the shared-memory ring channel,
//! `shm`, both exactly as the daemon creates them), one thread pinned to `--switch-core`
//! plays the worker: it hands batches of `--batch` frames of `--frame-size` bytes to the
//! channel's [`EndpointSink::deliver`] for `--seconds`, as fast as the channel takes them
//! (frames a full channel refuses count as dropped, as they would in the daemon), or at
//! `--rate` frames/s. Another thread, pinned to `--client-core`, is the client: it drains the
//! channel with the client library ([`usnetd_client::channel::UdsChannel`],
//! [`usnetd_client::shm::ShmClient`]) and sleeps on the channel's fd when it is empty, as a
//! client stack would.
//!
//! Reported per kind: frames delivered (taken by the channel) and received (read by the
//! client) per second, and the switch thread's CPU time per delivered frame (its on-CPU time
//! from `/proc/thread-self/schedstat`, so a thread waiting for its core is not charged).
//! Kinds run one after the other in one invocation, so their figures compare side by side.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};
use serde::Serialize;
use usnetd::channel::{ShmChannel, UdsChannel};
use usnetd::daemon::{SHM_SLOTS, SHM_SLOT_SIZE};
use usnetd_client::channel::{PacketChannel, UdsChannel as ClientUds};
use usnetd_client::shm::ShmClient;
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::MAX_BATCH;

/// The MTU the Unix datagram channel is made for.
const MTU: usize = 1500;

/// A channel kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Unix datagram socketpair (`RequestUDS`): one datagram per frame.
    Uds,
    /// Shared-memory rings with eventfd wake-ups (`RequestShm`).
    Shm,
}

/// Options of `channel`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Channel kinds to measure, one after the other.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Uds, Kind::Shm])]
    pub kind: Vec<Kind>,
    /// Frame length in bytes (60..=1514).
    #[arg(long, default_value_t = 64)]
    pub frame_size: usize,
    /// Frames per deliver call (1..=64), like a worker's per-endpoint group of a batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Frames per second offered (0: as fast as the channel takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Seconds per kind.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Core of the switch (worker) thread.
    #[arg(long, default_value_t = 0)]
    pub switch_core: usize,
    /// Core of the client thread.
    #[arg(long, default_value_t = 1)]
    pub client_core: usize,
    /// One JSON line per kind.
    #[arg(long)]
    pub json: bool,
}

/// One kind's result.
#[derive(Debug, Serialize)]
struct Report {
    role: &'static str,
    kind: Kind,
    frame_size: usize,
    batch: usize,
    seconds: f64,
    offered: u64,
    delivered: u64,
    received: u64,
    delivered_pps: f64,
    received_pps: f64,
    /// Switch thread on-CPU nanoseconds per delivered frame.
    switch_ns_per_frame: f64,
    /// Switch thread on-CPU time / wall time.
    switch_cpu_share: f64,
}

/// The client's end, whichever kind.
enum ClientEnd {
    Uds(ClientUds),
    Shm(Box<ShmClient>),
}

impl ClientEnd {
    /// Reads what is pending; returns the number of frames.
    fn drain(&mut self, buf: &mut [u8]) -> u64 {
        match self {
            ClientEnd::Uds(c) => {
                let mut n = 0;
                while let Ok(Some(_)) = c.recv(buf) {
                    n += 1;
                }
                n
            }
            ClientEnd::Shm(c) => {
                let mut n = 0;
                loop {
                    let got = c.recv_batch(|_| {});
                    if got == 0 {
                        return n;
                    }
                    n += got as u64;
                }
            }
        }
    }

    fn wait(&mut self, timeout: Duration) {
        let _ = match self {
            ClientEnd::Uds(c) => c.wait(Some(timeout)),
            ClientEnd::Shm(c) => c.wait(Some(timeout)),
        };
    }
}

/// The calling thread's on-CPU time so far (nanoseconds), from schedstat.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Runs every kind.
pub fn run(args: &Args) -> Result<(), String> {
    if !(60..=1514).contains(&args.frame_size) {
        return Err("--frame-size must be 60..=1514".into());
    }
    if args.batch == 0 || args.batch > MAX_BATCH {
        return Err(format!("--batch must be 1..={MAX_BATCH}"));
    }
    if args.seconds.is_nan() || args.seconds <= 0.0 || args.seconds > 3600.0 {
        return Err("--seconds must be in (0, 3600]".into());
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for c in [args.switch_core, args.client_core] {
        if !cores.iter().any(|id| id.id == c) {
            return Err(format!("core {c} is not available"));
        }
    }
    for &kind in &args.kind {
        let report = measure(kind, args)?;
        if args.json {
            println!("{}", serde_json::to_string(&report).expect("serializable"));
        } else {
            println!(
                "channel {:?}: delivered {:.0} frames/s, received {:.0} frames/s, switch {:.0} ns per frame (cpu share {:.2}), dropped {}",
                kind,
                report.delivered_pps,
                report.received_pps,
                report.switch_ns_per_frame,
                report.switch_cpu_share,
                report.offered - report.delivered
            );
        }
    }
    Ok(())
}

fn measure(kind: Kind, args: &Args) -> Result<Report, String> {
    let (sink, client): (Arc<dyn EndpointSink>, ClientEnd) = match kind {
        Kind::Uds => {
            let (fd, sink, _source) = UdsChannel::pair(MTU).map_err(|e| format!("uds: {e}"))?;
            (Arc::new(sink), ClientEnd::Uds(ClientUds::new(fd)))
        }
        Kind::Shm => {
            let (handover, sink, _source) =
                ShmChannel::create(1, SHM_SLOTS, SHM_SLOT_SIZE).map_err(|e| format!("shm: {e}"))?;
            let client = ShmClient::from_fds(
                handover.memfd,
                [handover.to_client_event, handover.to_switch_event],
            )
            .map_err(|e| format!("shm client: {e}"))?;
            (Arc::new(sink), ClientEnd::Shm(Box::new(client)))
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let client_thread = {
        let (stop, received, core) = (stop.clone(), received.clone(), args.client_core);
        let mut client = client;
        std::thread::spawn(move || {
            core_affinity::set_for_current(core_affinity::CoreId { id: core });
            let mut buf = vec![0u8; 2048];
            let mut total = 0;
            while !stop.load(Relaxed) {
                let n = client.drain(&mut buf);
                total += n;
                received.store(total, Relaxed);
                if n == 0 {
                    client.wait(Duration::from_millis(10));
                }
            }
            // What is still in the channel once the switch stopped.
            total += client.drain(&mut buf);
            received.store(total, Relaxed);
        })
    };

    core_affinity::set_for_current(core_affinity::CoreId {
        id: args.switch_core,
    });
    let frame: Vec<u8> = (0..args.frame_size).map(|i| i as u8).collect();
    let batch: Vec<&[u8]> = vec![frame.as_slice(); args.batch];
    let window = Duration::from_secs_f64(args.seconds);
    let (mut offered, mut delivered) = (0u64, 0u64);
    let cpu0 = thread_cpu_ns();
    let start = Instant::now();
    loop {
        let now = Instant::now();
        let elapsed = now.duration_since(start);
        if elapsed >= window {
            break;
        }
        if args.rate > 0 {
            let due = (elapsed.as_secs_f64() * args.rate as f64) as u64;
            if due < offered + args.batch as u64 {
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
        }
        offered += args.batch as u64;
        delivered += sink.deliver(0, &batch) as u64;
    }
    let wall = start.elapsed();
    let cpu = match (cpu0, thread_cpu_ns()) {
        (Some(a), Some(b)) => b.saturating_sub(a),
        _ => wall.as_nanos() as u64,
    };
    // Let the client read the rest, then stop it.
    let settle = Instant::now();
    while received.load(Relaxed) < delivered && settle.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Relaxed);
    client_thread
        .join()
        .map_err(|_| "the client thread panicked")?;
    let secs = wall.as_secs_f64();
    let received = received.load(Relaxed);
    Ok(Report {
        role: "channel",
        kind,
        frame_size: args.frame_size,
        batch: args.batch,
        seconds: secs,
        offered,
        delivered,
        received,
        delivered_pps: delivered as f64 / secs,
        received_pps: received as f64 / secs,
        switch_ns_per_frame: if delivered > 0 {
            cpu as f64 / delivered as f64
        } else {
            0.0
        },
        switch_cpu_share: cpu as f64 / wall.as_nanos() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_delivered_frame_reaches_the_client() {
        let last = core_affinity::get_core_ids()
            .unwrap_or_default()
            .iter()
            .map(|c| c.id)
            .max()
            .unwrap_or(0);
        for kind in [Kind::Uds, Kind::Shm] {
            let args = Args {
                kind: vec![kind],
                frame_size: 64,
                batch: 32,
                rate: 0,
                seconds: 0.2,
                switch_core: 0,
                client_core: last,
                json: true,
            };
            let r = measure(kind, &args).expect("measure");
            assert!(r.delivered > 0, "{kind:?}: nothing delivered");
            assert!(r.delivered <= r.offered);
            assert_eq!(r.received, r.delivered, "{kind:?}");
        }
    }
}
