//! The in-memory data-plane benchmark.
//!
//! Setup: the [`workload`](crate::workload) table and frames; N workers, each pinned to its
//! core (`--cores`, default `0..N`), each with its own in-memory NIC receive queue that serves
//! the shared pre-generated frames in a loop (every worker starts at a different offset), a
//! counting NIC transmit queue, and the real worker code (classify, batch lookup, grouping,
//! one `deliver` per endpoint and batch).
//!
//! Endpoint channels are [`MemSink`]s with one ring per worker of 2048-byte slots into which
//! every delivered frame is really copied. No thread drains them (on a 2-core machine a
//! drainer would steal a worker's core): a full ring counts its oldest frame as consumed and
//! reuses the slot ([`WhenFull::ConsumeOldest`]), so rings never stall the workers.
//!
//! Counting: only frames that arrived in an endpoint channel count, i.e. the sum of the
//! sinks' accepted frames over the measurement window (after a warm-up). `mpps` is that sum
//! divided by the window. `ns_per_frame` is the time one worker spends per frame: the
//! workers' on-CPU time over the window (from `/proc/self/task/TID/schedstat`, so other
//! processes competing for the cores do not inflate it) divided by the frames; where
//! schedstat is unavailable, `workers * window / frames`. The JSON output has both, plus
//! `cpu_share` (on-CPU time / wall time per worker: below ~0.95 the machine was busy with
//! something else and `mpps` understates the data plane).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use usnetd_shards::cores::parse_core_list;
use usnetd_shards::counters::{CounterSnapshot, WorkerCounters};
use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::memport::{LoopRx, MemSink, MemTx, WhenFull};
use usnetd_shards::worker::{NicShared, Worker, WorkerParts};

use crate::workload;

/// Bytes per ring slot.
const SLOT_SIZE: usize = 2048;

/// Options of `usnetd-bench dataplane`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Number of workers (threads, one NIC receive queue each).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Number of rules in the table.
    #[arg(long, default_value_t = 10_000)]
    rules: usize,
    /// Frame size in bytes (at least 64).
    #[arg(long = "frame-size", default_value_t = 64)]
    frame_size: usize,
    /// Length of the measurement window in seconds (after a warm-up of a fifth of it, at
    /// most one second).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Number of distinct flows in the traffic (default: one per rule).
    #[arg(long)]
    flows: Option<usize>,
    /// Cores to pin workers to, taskset syntax (`2-5,8`); default `0..workers`.
    #[arg(long)]
    cores: Option<String>,
    /// Slots per worker ring in each endpoint channel (each slot 2048 bytes).
    #[arg(long = "ring-slots", default_value_t = 256)]
    ring_slots: usize,
    /// Print a JSON object instead of the one-line summary.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark and prints its result.
pub fn run(args: &Args) -> Result<(), String> {
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.rules == 0 {
        return Err("--rules must be at least 1".into());
    }
    if !(64..=SLOT_SIZE).contains(&args.frame_size) {
        return Err(format!("--frame-size must be within 64..={SLOT_SIZE}"));
    }
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return Err("--seconds must be positive".into());
    }
    let cores = match &args.cores {
        Some(list) => parse_core_list(list).map_err(|e| format!("--cores: {e}"))?,
        None => (0..args.workers).collect(),
    };
    if cores.len() < args.workers {
        return Err(format!(
            "--cores names {} cores for {} workers",
            cores.len(),
            args.workers
        ));
    }
    if args.ring_slots == 0 {
        return Err("--ring-slots must be at least 1".into());
    }
    let flows = args.flows.unwrap_or(args.rules);

    let setup = Instant::now();
    let mut sinks: Vec<Arc<MemSink>> = Vec::new();
    let (table, frames) = workload::build(args.rules, flows, args.frame_size, |_| {
        let sink = Arc::new(MemSink::new(
            args.workers,
            args.ring_slots,
            SLOT_SIZE,
            WhenFull::ConsumeOldest,
        ));
        sinks.push(sink.clone());
        sink as Arc<dyn EndpointSink>
    });
    let frames = Arc::new(frames);
    let table = Arc::new(Mutex::new(table));
    let nic = Arc::new(NicShared::new());
    let setup_s = setup.elapsed().as_secs_f64();

    let stop = Arc::new(AtomicBool::new(false));
    let start_line = Arc::new(Barrier::new(args.workers + 1));
    let mut counters = Vec::new();
    let mut threads = Vec::new();
    let mut pinned_all = true;
    let (tid_tx, tid_rx) = crossbeam_channel::unbounded::<Option<u32>>();
    let available = core_affinity::get_core_ids().unwrap_or_default();
    for (w, &core) in cores.iter().enumerate().take(args.workers) {
        let core_id = available.iter().copied().find(|c| c.id == core);
        if core_id.is_none() {
            pinned_all = false;
            eprintln!("usnetd-bench: core {core} is not available; worker {w} is not pinned");
        }
        let worker_counters = Arc::new(WorkerCounters::new());
        counters.push(worker_counters.clone());
        let (_commands, command_rx) = crossbeam_channel::unbounded();
        let rx = LoopRx::new(frames.clone(), w * frames.len() / args.workers);
        let (tx, _) = MemTx::counting();
        let mut worker = Worker::new(WorkerParts {
            id: w,
            nic_rx: vec![Box::new(rx)],
            nic_tx: Box::new(tx),
            table: table.clone(),
            nic: nic.clone(),
            counters: worker_counters,
            commands: command_rx,
        });
        let (stop, start_line, tid_tx) = (stop.clone(), start_line.clone(), tid_tx.clone());
        threads.push(
            thread::Builder::new()
                .name(format!("worker {w}"))
                .spawn(move || {
                    if let Some(id) = core_id {
                        if !core_affinity::set_for_current(id) {
                            eprintln!("usnetd-bench: pinning worker {w} to core {} failed", id.id);
                        }
                    }
                    let tid = std::fs::read_link("/proc/thread-self")
                        .ok()
                        .and_then(|p| p.file_name()?.to_str()?.parse::<u32>().ok());
                    let _ = tid_tx.send(tid);
                    start_line.wait();
                    worker.run(&stop);
                })
                .map_err(|e| format!("spawning worker {w}: {e}"))?,
        );
    }

    let tids: Vec<Option<u32>> = (0..args.workers)
        .map(|_| tid_rx.recv().ok().flatten())
        .collect();
    let cpu_ns = || -> Option<u64> {
        tids.iter()
            .map(|tid| {
                let text =
                    std::fs::read_to_string(format!("/proc/self/task/{}/schedstat", (*tid)?))
                        .ok()?;
                text.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    };
    start_line.wait();
    let warmup = Duration::from_secs_f64((args.seconds / 5.0).min(1.0));
    thread::sleep(warmup);
    let delivered = || sinks.iter().map(|s| s.accepted()).sum::<u64>();
    let (t0, d0, c0) = (Instant::now(), delivered(), cpu_ns());
    thread::sleep(Duration::from_secs_f64(args.seconds));
    let (t1, d1, c1) = (Instant::now(), delivered(), cpu_ns());
    stop.store(true, Relaxed);
    for t in threads {
        t.join().map_err(|_| "a worker panicked".to_string())?;
    }

    let window = (t1 - t0).as_secs_f64();
    let frames_delivered = d1 - d0;
    let mpps = frames_delivered as f64 / window / 1e6;
    let per_frame = |ns: f64| {
        if frames_delivered == 0 {
            f64::INFINITY
        } else {
            ns / frames_delivered as f64
        }
    };
    let wall_ns_per_frame = per_frame(args.workers as f64 * window * 1e9);
    let cpu_window_ns = match (c0, c1) {
        (Some(c0), Some(c1)) if c1 > c0 => Some((c1 - c0) as f64),
        _ => None,
    };
    let ns_per_frame = cpu_window_ns.map_or(wall_ns_per_frame, per_frame);
    let cpu_share = cpu_window_ns.map(|c| c / (args.workers as f64 * window * 1e9));
    let totals = CounterSnapshot::sum(counters.iter().map(|c| &**c));
    if args.json {
        let drops: serde_json::Map<String, serde_json::Value> =
            usnetd_shards::counters::DropReason::ALL
                .iter()
                .filter(|r| totals.dropped(**r) > 0)
                .map(|r| (r.name().to_string(), totals.dropped(*r).into()))
                .collect();
        let out = serde_json::json!({
            "benchmark": "dataplane",
            "workers": args.workers,
            "rules": args.rules,
            "frame": args.frame_size,
            "flows": flows.clamp(1, args.rules),
            "seconds": window,
            "mpps": mpps,
            "ns_per_frame": ns_per_frame,
            "wall_ns_per_frame": wall_ns_per_frame,
            "cpu_share": cpu_share,
            "mpps_if_cores_were_idle": args.workers as f64 * 1e3 / ns_per_frame,
            "frames_delivered": frames_delivered,
            "frames_in_total": totals.frames_in,
            "delivered_total": totals.total_delivered(),
            "drops_total": drops,
            "cores": &cores[..args.workers],
            "pinned": pinned_all,
            "ring_slots": args.ring_slots,
            "setup_seconds": setup_s,
        });
        println!("{out}");
    } else {
        println!(
            "dataplane workers={} rules={} frame={} mpps={:.2} ns_per_frame={:.1}",
            args.workers, args.rules, args.frame_size, mpps, ns_per_frame
        );
    }
    Ok(())
}
