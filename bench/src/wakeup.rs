//! `usnetd-bench wakeup`: what it costs here to wake a sleeping thread, the unit in which the
//! switch's added latency is paid.
//!
//! Two threads, pinned to `--from` and `--to`, pass a byte back and forth over a pair of Unix
//! datagram sockets; each round trip is two wake-ups of a thread blocked in `recv`. Rounds
//! start `--gap-us` apart, so that the woken core has gone idle in between (as it has between
//! the frames of a lightly loaded switch): on a VM an idle virtual CPU is halted and needs an
//! interrupt through the hypervisor to run again. Prints the percentiles of one wake-up (half
//! a round trip) in microseconds.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::report::Percentiles;

/// Options of `wakeup`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Core of the thread that starts each round.
    #[arg(long, default_value_t = 0)]
    pub from: usize,
    /// Core of the thread that is woken and answers.
    #[arg(long, default_value_t = 1)]
    pub to: usize,
    /// Pause between rounds in microseconds (long enough for the cores to go idle).
    #[arg(long, default_value_t = 1000)]
    pub gap_us: u64,
    /// Rounds.
    #[arg(long, default_value_t = 2000)]
    pub rounds: u32,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    role: &'static str,
    from: usize,
    to: usize,
    gap_us: u64,
    /// One wake-up: half a round trip.
    wakeup_us: Percentiles,
}

/// Runs the measurement.
pub fn run(args: &Args) -> Result<(), String> {
    if args.rounds == 0 {
        return Err("--rounds must be positive".into());
    }
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    for c in [args.from, args.to] {
        if !cores.iter().any(|id| id.id == c) {
            return Err(format!("core {c} is not available"));
        }
    }
    let (a, b) = UnixDatagram::pair().map_err(|e| format!("socketpair: {e}"))?;
    let to = args.to;
    let answerer = std::thread::spawn(move || {
        core_affinity::set_for_current(core_affinity::CoreId { id: to });
        let mut byte = [0u8; 1];
        // An empty datagram (or an error) ends it.
        while let Ok(1) = b.recv(&mut byte) {
            if b.send(&byte).is_err() {
                break;
            }
        }
    });
    core_affinity::set_for_current(core_affinity::CoreId { id: args.from });
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3).expect("valid bounds");
    let mut byte = [0u8; 1];
    for _ in 0..args.rounds {
        std::thread::sleep(Duration::from_micros(args.gap_us));
        let start = Instant::now();
        a.send(&byte).map_err(|e| format!("send: {e}"))?;
        a.recv(&mut byte).map_err(|e| format!("recv: {e}"))?;
        let half = start.elapsed().as_nanos() as u64 / 2;
        hist.record(half.max(1)).expect("within bounds");
    }
    let _ = a.send(&[]);
    answerer
        .join()
        .map_err(|_| "the answering thread panicked")?;
    let report = Report {
        role: "wakeup",
        from: args.from,
        to: args.to,
        gap_us: args.gap_us,
        wakeup_us: Percentiles::from_ns(&hist),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("serializable"));
    } else {
        let p = report.wakeup_us;
        println!(
            "wakeup core {} -> {} (rounds {} us apart): p50 {:.1} p90 {:.1} p99 {:.1} max {:.1} us",
            args.from, args.to, args.gap_us, p.p50, p.p90, p.p99, p.max
        );
    }
    Ok(())
}
