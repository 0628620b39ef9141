//! Control-plane measurements.
//!
//! `addmatch --ctl CTL`: attaches as a client (one UDS channel), then registers `--count`
//! listening rules on consecutive ports, timing each AddMatch round trip; prints percentiles
//! (microseconds) and the rate. The client is deleted at the end (its rules go with it).
//!
//! `flows --dst ADDR:PORT --count N`: opens N UDP flows from the calling namespace's kernel
//! (one datagram each from source ports `--src-port`, `--src-port`+1, ...), paced at `--rate`
//! per second, so that a switch in front of that kernel learns one rule per flow.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use hdrhistogram::Histogram;
use serde::Serialize;
use usnetd_client::protocol::UsnetMatch;
use usnetd_client::Client;

use crate::report::Percentiles;

/// Options of `addmatch`.
#[derive(ClapArgs, Debug, Clone)]
pub struct AddMatchArgs {
    /// usnetd's control socket.
    #[arg(long)]
    pub ctl: PathBuf,
    /// Interface of the channel.
    #[arg(long, default_value = "sw0")]
    pub iface: String,
    /// Local IP of the rules.
    #[arg(long, default_value = "10.77.0.2")]
    pub ip: IpAddr,
    /// First local port.
    #[arg(long, default_value_t = 20000)]
    pub port_base: u16,
    /// Rules to add (the daemon allows MAX_RULES_PER_CLIENT per client, default 4096).
    #[arg(long, default_value_t = 1000)]
    pub count: u16,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `addmatch` measured.
#[derive(Debug, Serialize)]
pub struct AddMatchSummary {
    /// Rules the daemon accepted.
    pub accepted: u64,
    /// Rules it refused.
    pub refused: u64,
    /// Round trips per second (sequential requests).
    pub per_second: f64,
    /// Round-trip time percentiles in microseconds.
    pub rtt_us: Percentiles,
}

/// Runs `addmatch`.
pub fn addmatch(args: &AddMatchArgs) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("usnetd-bench-ctl-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let client = Client::connect(&args.ctl, &path).map_err(|e| format!("connect: {e}"))?;
    let result = (|| -> Result<AddMatchSummary, String> {
        let _channel = client
            .request_uds(&args.iface, std::process::id() as i32)
            .map_err(|e| format!("RequestUDS: {e}"))?;
        let mut hist =
            Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
        let (mut accepted, mut refused) = (0u64, 0u64);
        let start = Instant::now();
        for i in 0..args.count {
            let rule = UsnetMatch {
                dst_addr: args.ip.into(),
                dst_port: Some(args.port_base.wrapping_add(i)),
                src_addr: None,
                src_port: None,
                protocol: 17,
            };
            let t = Instant::now();
            let ok = client
                .add_match(&rule)
                .map_err(|e| format!("AddMatch: {e}"))?;
            let _ = hist.record((t.elapsed().as_nanos() as u64).max(1));
            if ok {
                accepted += 1;
            } else {
                refused += 1;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(AddMatchSummary {
            accepted,
            refused,
            per_second: if secs > 0.0 {
                f64::from(args.count) / secs
            } else {
                0.0
            },
            rtt_us: Percentiles::from_ns(&hist),
        })
    })();
    let _ = client.delete_client();
    let _ = std::fs::remove_file(&path);
    let s = result?;
    if args.json {
        println!("{}", serde_json::to_string(&s).expect("serializes"));
    } else {
        println!(
            "addmatch: {} accepted {} refused, {:.0}/s; rtt_us p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}",
            s.accepted, s.refused, s.per_second, s.rtt_us.p50, s.rtt_us.p90, s.rtt_us.p99, s.rtt_us.p999, s.rtt_us.max
        );
    }
    Ok(())
}

/// Options of `flows`.
#[derive(ClapArgs, Debug, Clone)]
pub struct FlowsArgs {
    /// Where the datagrams go.
    #[arg(long)]
    pub dst: SocketAddr,
    /// Network namespace to enter first.
    #[arg(long)]
    pub netns: Option<String>,
    /// Flows to open.
    #[arg(long, default_value_t = 1000)]
    pub count: u32,
    /// First source port.
    #[arg(long, default_value_t = 20000)]
    pub src_port: u16,
    /// Flows per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `flows`.
pub fn flows(args: &FlowsArgs) -> Result<(), String> {
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns).map_err(|e| format!("entering netns: {e}"))?;
    }
    let local: IpAddr = if args.dst.is_ipv6() {
        "::".parse().expect("valid")
    } else {
        "0.0.0.0".parse().expect("valid")
    };
    let start = Instant::now();
    let (mut opened, mut failed) = (0u64, 0u64);
    for i in 0..args.count {
        if args.rate > 0 {
            let due = start + Duration::from_secs_f64(f64::from(i) / args.rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
        }
        let port = args.src_port.wrapping_add((i % 40000) as u16);
        let sent = UdpSocket::bind(SocketAddr::new(local, port))
            .and_then(|s| s.send_to(b"usnetd-bench flow", args.dst));
        match sent {
            Ok(_) => opened += 1,
            Err(_) => failed += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        opened as f64 / secs
    } else {
        0.0
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "opened": opened, "failed": failed, "seconds": secs, "per_second": rate })
        );
    } else {
        println!("flows: {opened} opened ({failed} failed) in {secs:.3} s: {rate:.0}/s");
    }
    Ok(())
}
