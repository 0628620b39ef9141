//! `usnetd-bench latency` and `usnetd-bench echo`: UDP round-trip times.
//!
//! `echo --bind ADDR:PORT` answers every datagram with itself. `latency --dst ADDR:PORT`
//! sends small probes (the [`crate::probe`] signature: sequence number and send time) at
//! `--rate` per second for `--seconds`, waits up to one second for late answers, and prints
//! RTT percentiles (p50/p90/p99/p99.9/max, microseconds) from an HDR histogram, with the
//! number of probes sent, answered and lost.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::probe::{self, MAGIC, SIGNATURE_LEN};
use crate::report::Percentiles;

/// Options of `echo`.
#[derive(ClapArgs, Debug, Clone)]
pub struct EchoArgs {
    /// Address to answer on.
    #[arg(long)]
    pub bind: SocketAddr,
    /// Network namespace to enter first.
    #[arg(long)]
    pub netns: Option<String>,
    /// Stop after this many seconds (0: until a signal).
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
}

/// Runs the echo responder.
pub fn echo(args: &EchoArgs) -> Result<(), String> {
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns).map_err(|e| format!("entering netns: {e}"))?;
    }
    let socket = UdpSocket::bind(args.bind).map_err(|e| format!("binding {}: {e}", args.bind))?;
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| e.to_string())?;
    let stop = crate::signals::stop_flag();
    let start = Instant::now();
    eprintln!("echo ready on {}", args.bind);
    let mut buf = [0u8; 2048];
    let mut answered: u64 = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && (args.seconds <= 0.0 || start.elapsed().as_secs_f64() < args.seconds)
    {
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => {
                if socket.send_to(&buf[..n], from).is_ok() {
                    answered += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
    eprintln!("echo: answered {answered} datagrams");
    Ok(())
}

/// Options of `latency`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// The echo responder.
    #[arg(long)]
    pub dst: SocketAddr,
    /// Network namespace to enter first.
    #[arg(long)]
    pub netns: Option<String>,
    /// Probes per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds to send probes.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Probe payload bytes (at least 16).
    #[arg(long, default_value_t = 18)]
    pub size: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `latency` measured.
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    /// Probes sent.
    pub sent: u64,
    /// Probes answered (each at most once).
    pub received: u64,
    /// Probes without answer.
    pub lost: u64,
    /// Round-trip time percentiles in microseconds.
    pub rtt_us: Percentiles,
}

/// Runs the latency probe.
pub fn run(args: &Args) -> Result<(), String> {
    if args.rate == 0 || args.seconds.is_nan() || args.seconds <= 0.0 {
        return Err("--rate and --seconds must be positive".into());
    }
    if args.size < SIGNATURE_LEN || args.size > 1400 {
        return Err(format!("--size must be {SIGNATURE_LEN}..=1400"));
    }
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns).map_err(|e| format!("entering netns: {e}"))?;
    }
    let bind: SocketAddr = if args.dst.is_ipv6() {
        "[::]:0".parse().expect("valid")
    } else {
        "0.0.0.0:0".parse().expect("valid")
    };
    let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    socket
        .connect(args.dst)
        .map_err(|e| format!("connect {}: {e}", args.dst))?;
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    let stop = crate::signals::stop_flag();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let total = (args.rate as f64 * args.seconds) as u64;
    let interval_ns = 1e9 / args.rate as f64;
    let mut answered = vec![false; total as usize];
    let mut out = vec![0u8; args.size];
    out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    let mut buf = [0u8; 2048];
    let start_ns = probe::now_ns();
    let mut sent: u64 = 0;
    let mut received: u64 = 0;
    let mut end_ns: Option<u64> = None;
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        let now = probe::now_ns();
        if sent < total {
            let due = start_ns + (sent as f64 * interval_ns) as u64;
            if now >= due {
                out[4..8].copy_from_slice(&(sent as u32).to_be_bytes());
                out[8..16].copy_from_slice(&probe::now_ns().to_be_bytes());
                match socket.send(&out) {
                    Ok(_) => sent += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    // ICMP errors (port unreachable) surface here: count as sent, unanswered.
                    Err(_) => sent += 1,
                }
                continue;
            }
        } else if end_ns.is_none() {
            end_ns = Some(now + 1_000_000_000);
        }
        if let Some(end) = end_ns {
            if now >= end || received == sent {
                break;
            }
        }
        // Drain answers.
        loop {
            match socket.recv(&mut buf) {
                Ok(n) => {
                    let t = probe::now_ns();
                    if let Some(p) = probe::parse_payload(&buf[..n]) {
                        let i = p.seq as usize;
                        if i < answered.len() && !answered[i] {
                            answered[i] = true;
                            received += 1;
                            let _ = hist.record(t.saturating_sub(p.time_ns).max(1));
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {} // a queued ICMP error; keep reading
            }
        }
        // Sleep until the next probe is due (or briefly, while waiting for late answers).
        let now = probe::now_ns();
        let next = if sent < total {
            start_ns + (sent as f64 * interval_ns) as u64
        } else {
            now + 1_000_000
        };
        let wait = next.saturating_sub(now);
        if wait > 0 {
            let ts = libc::timespec {
                tv_sec: (wait / 1_000_000_000) as libc::time_t,
                tv_nsec: (wait % 1_000_000_000) as libc::c_long,
            };
            let mut pfd = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd and a valid timespec; no signal mask change.
            unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        }
    }
    let summary = LatencySummary {
        sent,
        received,
        lost: sent - received,
        rtt_us: Percentiles::from_ns(&hist),
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary).expect("serializes"));
    } else {
        let p = summary.rtt_us;
        println!(
            "latency to {}: sent {} received {} lost {}; rtt_us p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
            args.dst, sent, received, summary.lost, p.p50, p.p90, p.p99, p.p999, p.max
        );
    }
    Ok(())
}
