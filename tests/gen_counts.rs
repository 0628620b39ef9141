//! The traffic generator's, the switch's and the sinks' counts agree (root only; skips
//! otherwise).
//!
//! On a fresh testbed with usnetd (packet backend, two workers) in front of the switch's host,
//! `usnetd-bench gen` sends a fixed number of frames at a modest rate from the peer
//! 1. to a usnetd client (`usnetd-bench sink --usnetd`, UDS channel),
//! 2. to a kernel UDP socket behind a DEBUG_PORTS rule (`usnetd-bench sink --udp`),
//! 3. with the AF_XDP generator (`--io xdp`, two threads on two queues each) to a client over
//!    the shared-memory channel, and
//! 4. with the `PACKET_TX_RING` generator (`--io packet-ring`) to the kernel UDP socket.
//!
//! For each: the generator handed exactly that many frames to the NIC; every one of them
//! reached the sink or is a counted drop (the switch's `channel_full` in stats.json, the
//! kernel's UDP receive-buffer errors, the generator's NIC's `tx_dropped`); the switch saw at
//! least as many frames as the NIC did not drop and delivered at least what the sink received.
//! No timing assertions; every wait is bounded.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/shell.rs"]
mod shell;
use shell::{is_root, root_dir, run as sh};

const FRAMES: u64 = 20_000;
const RATE: u64 = 20_000;
const CLIENT_PORT: u16 = 9001;
const KERNEL_PORT: u16 = 9000;

/// The bench binary next to the daemon's (built on demand when missing).
fn bench_binary() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_usnetd")).with_file_name("usnetd-bench");
    // Always (cheap when up to date): a binary left from an older checkout would be stale.
    {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "usnetd-bench"])
            .current_dir(root_dir());
        if path.to_string_lossy().contains("/release/") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo runs");
        assert!(st.success(), "building usnetd-bench failed");
    }
    assert!(path.exists(), "no usnetd-bench at {}", path.display());
    path
}

#[path = "common/testbed.rs"]
mod testbed;
use testbed::{Background, Daemon, Testbed};

/// Waits (bounded) for a background process to exit and returns its stdout.
fn finish(mut bg: Background, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = bg.0.try_wait().expect("try_wait") {
            let mut out = String::new();
            if let Some(mut o) = bg.0.stdout.take() {
                use std::io::Read;
                let _ = o.read_to_string(&mut out);
            }
            assert!(st.success(), "process failed ({st}): {out}");
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "process did not finish in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sums over all workers of stats.json: (frames_in, delivered, channel_full).
#[derive(Debug, Clone, Copy, Default)]
struct SwitchCounts {
    frames_in: u64,
    delivered: u64,
    channel_full: u64,
    /// Frames the kernel dropped at the switch's full receive rings.
    ring_drops: u64,
}

fn read_stats(path: &Path) -> Option<SwitchCounts> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut c = SwitchCounts::default();
    for w in v.get("sw0")?.get("workers")?.as_array()? {
        c.frames_in += w.get("frames_in")?.as_u64()?;
        c.delivered += w.get("delivered")?.as_u64()?;
        c.channel_full += w.get("drops")?.get("channel_full")?.as_u64()?;
        c.ring_drops += w.get("ring_drops")?.as_u64()?;
    }
    Some(c)
}

/// The switch's counters once they have settled (two equal reads of the file, which is
/// rewritten every second), bounded.
fn settled_stats(path: &Path) -> SwitchCounts {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last: Option<(u64, u64, u64, u64)> = None;
    loop {
        std::thread::sleep(Duration::from_millis(1100));
        if let Some(c) = read_stats(path) {
            let key = (c.frames_in, c.delivered, c.channel_full, c.ring_drops);
            if last == Some(key) {
                return c;
            }
            last = Some(key);
        }
        assert!(
            Instant::now() < deadline,
            "stats.json at {} did not settle",
            path.display()
        );
    }
}

fn json_u64(out: &str, field: &str) -> u64 {
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON summary in {out:?}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("summary is JSON");
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no {field} in {line}"))
}

/// The kernel's UDP receive-buffer errors in the switch's namespace.
fn udp_rcvbuf_errors(tb: &Testbed) -> u64 {
    let out = sh(&format!("ip netns exec {} cat /proc/net/snmp", tb.ns("sw")));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        panic!("no Udp lines in /proc/net/snmp");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == "RcvbufErrors")
        .expect("RcvbufErrors column");
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn spawn_sink(bench: &Path, args: &[&str], ready: &Path) -> Background {
    let _ = std::fs::remove_file(ready);
    let child = Command::new(bench)
        .arg("sink")
        .args(args)
        .args([
            "--count",
            &FRAMES.to_string(),
            "--seconds",
            "30",
            "--idle-exit",
            "3",
        ])
        .args(["--json", "--quiet", "--ready-file"])
        .arg(ready)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sink");
    let sink = Background(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "sink did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    sink
}

/// Runs the generator (with `io_args` choosing how it sends); returns the frames it handed to
/// the NIC and those the NIC dropped afterwards.
fn generate(bench: &Path, tb: &Testbed, dst_mac: &str, port: u16, io_args: &[&str]) -> (u64, u64) {
    let out = Command::new(bench)
        .args([
            "gen",
            "--netns",
            &tb.ns("peer"),
            "--iface",
            "peer0",
            "--dst-mac",
            dst_mac,
        ])
        .args([
            "--dst-port",
            &port.to_string(),
            "--flows",
            "8",
            "--frame-size",
            "128",
        ])
        .args(["--count", &FRAMES.to_string(), "--rate", &RATE.to_string()])
        .args(["--seconds", "30", "--json", "--quiet"])
        .args(io_args)
        .output()
        .expect("run gen");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "gen failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (json_u64(&stdout, "frames"), json_u64(&stdout, "dropped"))
}

/// One delivery to a sink started by `start_sink`, checked against the switch's counters and
/// (for the kernel socket) the kernel's UDP receive-buffer errors.
fn check_delivery(
    bench: &Path,
    tb: &Testbed,
    dst_mac: &str,
    target: Target,
    sink_args: &[&str],
    io_args: &[&str],
) {
    let dir = tb.dir.clone();
    let stats = dir.join("state").join("stats.json");
    let (port, label) = match target {
        Target::Client => (CLIENT_PORT, "client"),
        Target::Kernel => (KERNEL_PORT, "kernel"),
    };
    let sink = spawn_sink(bench, sink_args, &dir.join(format!("{label}-ready")));
    let before = settled_stats(&stats);
    let rcvbuf_before = udp_rcvbuf_errors(tb);
    let (sent, nic_dropped) = generate(bench, tb, dst_mac, port, io_args);
    let received = json_u64(&finish(sink, Duration::from_secs(40)), "frames");
    let after = settled_stats(&stats);
    let kernel_drops = udp_rcvbuf_errors(tb) - rcvbuf_before;
    let channel_full = after.channel_full - before.channel_full;
    let ring_drops = after.ring_drops - before.ring_drops;
    eprintln!(
        "{label} {io_args:?}: sent {sent} (NIC dropped {nic_dropped}) received {received} \
         rcvbuf drops {kernel_drops} switch before {before:?} after {after:?}"
    );
    assert_eq!(sent, FRAMES, "the generator did not send all frames");
    assert_eq!(
        received + channel_full + kernel_drops + nic_dropped + ring_drops,
        sent,
        "{label} {io_args:?}: frames neither received nor counted as dropped"
    );
    assert!(
        after.frames_in - before.frames_in + ring_drops >= sent - nic_dropped,
        "the switch saw fewer frames than the NIC passed on"
    );
    assert!(
        after.delivered - before.delivered >= received,
        "the sink received more than the switch delivered"
    );
}

#[derive(Clone, Copy)]
enum Target {
    Client,
    Kernel,
}

#[test]
fn generator_switch_and_sinks_agree() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces, packet sockets)");
        return;
    }
    let bench = bench_binary();
    let tb = Testbed::up("ug", "off");
    let dst_mac = String::from_utf8_lossy(
        &sh(&format!(
            "ip netns exec {} cat /sys/class/net/sw0/address",
            tb.ns("sw")
        ))
        .stdout,
    )
    .trim()
    .to_string();
    let debug_ports = format!("sw0:UDP:{KERNEL_PORT}");
    let _daemon = Daemon::start(
        &tb,
        &[
            ("BACKEND", "packet"),
            ("CORES", "0-1"),
            ("DEBUG_PORTS", &debug_ports),
        ],
    );
    let ctl = tb.dir.clone().join("ctl.sock");
    let ctl = ctl.to_str().unwrap();
    let port = CLIENT_PORT.to_string();
    let kernel = format!("0.0.0.0:{KERNEL_PORT}");
    let sw_ns = tb.ns("sw");
    let client = |channel: &'static str| {
        [
            "--usnetd",
            ctl,
            "--channel",
            channel,
            "--port",
            port.as_str(),
        ]
    };
    let kernel_sink = ["--netns", sw_ns.as_str(), "--udp", kernel.as_str()];
    let (uds, shm) = (client("uds"), client("shm"));

    // 1. AF_PACKET generator to a usnetd client over the UDS channel.
    check_delivery(&bench, &tb, &dst_mac, Target::Client, &uds, &[]);
    // 2. To a kernel UDP socket through the DEBUG_PORTS rule.
    check_delivery(&bench, &tb, &dst_mac, Target::Kernel, &kernel_sink, &[]);
    // 3. AF_XDP generator, two threads with two queues each, to a client over shared memory.
    let xdp = ["--io", "xdp", "--threads", "2", "--queues-per-thread", "2"];
    check_delivery(&bench, &tb, &dst_mac, Target::Client, &shm, &xdp);
    // 4. PACKET_TX_RING generator to the kernel socket.
    let ring = ["--io", "packet-ring"];
    check_delivery(&bench, &tb, &dst_mac, Target::Kernel, &kernel_sink, &ring);
}
