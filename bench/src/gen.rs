//! `usnetd-bench gen`: a pkt-gen-like traffic generator on AF_PACKET or AF_XDP.
//!
//! Sends UDP (or TCP SYN) frames over IPv4 or IPv6 with correct checksums, `--flows` source
//! ports, and the [`crate::probe`] signature (sequence number, send time) in the payload, one
//! transmit queue per thread:
//! - `--io packet` (default): [`usnetd::backend::packet::PacketBackend`]'s transmit sockets
//!   (`sendmmsg`, `PACKET_QDISC_BYPASS`);
//! - `--io packet-ring`: a `PACKET_TX_RING` per thread ([`crate::txring`]), one `send` per
//!   batch;
//! - `--io xdp`: transmit-only AF_XDP sockets ([`usnetd::backend::xdp::open_tx_only`], the
//!   daemon's own rings; copy mode on veth), thread `t` bound to the `--queues-per-thread` NIC
//!   queues from `--queue + t * queues_per_thread` on, no XDP program attached (the kernel
//!   keeps the interface's received frames). On a veth the transmit queue picks the peer's
//!   receive queue, i.e. the switch worker, so one thread can feed all workers.
//!
//! Flow `f` always leaves on the same queue, `f % (threads * queues per thread)` (queues
//! counted over all threads in order), and the flows of one queue take turns: the peer sees
//! what a NIC's RSS makes, each flow on one receive queue, in order. So there must be at
//! least as many flows as it takes to give every thread one.
//!
//! When the kernel queue is full the frames are retried, so with `--count` exactly that many
//! frames are handed to the NIC (unless `--seconds` runs out first). Frames the NIC accepted
//! but then dropped without telling the socket (AF_XDP into a veth whose peer's backlog is
//! full) show as `dropped`: the interface's `tx_dropped` increase over the run. Prints the
//! rate every second and a summary at the end.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};
use usnetd::backend::packet::PacketBackend;
use usnetd::backend::xdp::{self, XdpConfig, XdpTxQueue};
use usnetd::backend::Backend;
use usnetd_shards::port::{TxQueue, MAX_BATCH};

use crate::probe::{self, FlowSpec, FrameTemplate};
use crate::report::{Summary, Ticker};

/// How the generator hands frames to the NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Io {
    /// AF_PACKET sockets, `sendmmsg` with the qdisc bypassed.
    Packet,
    /// AF_PACKET `PACKET_TX_RING` (TPACKET_V2) with the qdisc bypassed: one `send` per batch.
    PacketRing,
    /// AF_XDP transmit rings (copy mode on veth), one socket per NIC queue.
    Xdp,
}

impl Io {
    fn name(self) -> &'static str {
        match self {
            Io::Packet => "packet",
            Io::PacketRing => "packet-ring",
            Io::Xdp => "xdp",
        }
    }
}

/// Options of `gen`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Interface to send on.
    #[arg(long)]
    pub iface: String,
    /// Network namespace to enter first (name under /run/netns or a path).
    #[arg(long)]
    pub netns: Option<String>,
    /// Destination MAC (aa:bb:cc:dd:ee:ff).
    #[arg(long)]
    pub dst_mac: String,
    /// Source MAC (default: the interface's).
    #[arg(long)]
    pub src_mac: Option<String>,
    /// Source IP (default 10.77.0.1, or fd77::1 with --ipv6).
    #[arg(long)]
    pub src_ip: Option<IpAddr>,
    /// Destination IP (default 10.77.0.2, or fd77::2 with --ipv6).
    #[arg(long)]
    pub dst_ip: Option<IpAddr>,
    /// Destination port.
    #[arg(long, default_value_t = 9000)]
    pub dst_port: u16,
    /// First source port; flow i uses src_port + i.
    #[arg(long, default_value_t = 10000)]
    pub src_port: u16,
    /// Number of flows (distinct source ports); flow f leaves on queue f % queues, the flows
    /// of a queue take turns.
    #[arg(long, default_value_t = 1)]
    pub flows: u16,
    /// Frame length without FCS (at least 58 for IPv4 UDP, 70 for TCP, 78/90 for IPv6).
    #[arg(long, default_value_t = 64)]
    pub frame_size: usize,
    /// Frames per second in total (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Longest sending time in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Frames to send in total (0: no limit, only --seconds).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Use the IPv6 default addresses (the family otherwise follows the addresses given).
    #[arg(long)]
    pub ipv6: bool,
    /// Send TCP SYN segments instead of UDP datagrams.
    #[arg(long)]
    pub tcp_syn: bool,
    /// Sending threads (each with its own socket).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// How frames are sent.
    #[arg(long, value_enum, default_value_t = Io::Packet)]
    pub io: Io,
    /// `--io xdp`: the first NIC queue used (thread t uses the queues from
    /// queue + t * queues_per_thread on).
    #[arg(long, default_value_t = 0)]
    pub queue: u32,
    /// `--io xdp`: NIC queues (AF_XDP sockets) per thread, each with its share of the flows.
    #[arg(long, default_value_t = 1)]
    pub queues_per_thread: u32,
    /// `--io xdp`: entries of each socket's tx ring (a power of two, at least 64).
    #[arg(long, default_value_t = 2048)]
    pub xdp_ring: u32,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No per-second lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Counters one sending thread publishes.
#[derive(Default)]
struct ThreadCounters {
    frames: AtomicU64,
    bytes: AtomicU64,
    full: AtomicU64,
}

/// Builds the flow templates from the options (the interface's MAC as the default source).
fn templates(args: &Args, src_mac: [u8; 6]) -> Result<Vec<FrameTemplate>, String> {
    let dst_mac = probe::parse_mac(&args.dst_mac)?;
    let (src_ip, dst_ip) = if args.ipv6 {
        (
            args.src_ip.unwrap_or("fd77::1".parse().expect("valid")),
            args.dst_ip.unwrap_or("fd77::2".parse().expect("valid")),
        )
    } else {
        (
            args.src_ip.unwrap_or("10.77.0.1".parse().expect("valid")),
            args.dst_ip.unwrap_or("10.77.0.2".parse().expect("valid")),
        )
    };
    if args.flows == 0 {
        return Err("--flows must be at least 1".into());
    }
    (0..args.flows)
        .map(|i| {
            FrameTemplate::new(&FlowSpec {
                dst_mac,
                src_mac,
                src_ip,
                dst_ip,
                src_port: args.src_port.wrapping_add(i),
                dst_port: args.dst_port,
                tcp_syn: args.tcp_syn,
                frame_size: args.frame_size,
            })
        })
        .collect()
}

/// Runs the generator.
pub fn run(args: &Args) -> Result<(), String> {
    if args.threads == 0 || args.threads > 64 {
        return Err("--threads must be 1..=64".into());
    }
    if args.seconds.is_nan() || args.seconds <= 0.0 {
        return Err("--seconds must be positive".into());
    }
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns).map_err(|e| format!("entering netns: {e}"))?;
    }
    let src_mac = match &args.src_mac {
        Some(m) => probe::parse_mac(m)?,
        None => {
            crate::netns::hw_addr(&args.iface).map_err(|e| format!("MAC of {}: {e}", args.iface))?
        }
    };
    let templates = Arc::new(templates(args, src_mac)?);
    let queues = open_queues(args)?;
    let dropped_before = crate::netns::tx_dropped(&args.iface).ok();
    let stop = crate::signals::stop_flag();
    let counters: Arc<Vec<ThreadCounters>> = Arc::new(
        (0..args.threads)
            .map(|_| ThreadCounters::default())
            .collect(),
    );
    let threads = args.threads as u64;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.seconds);
    let mut handles = Vec::new();
    // Every thread's lanes first, so that a bad combination fails before anything is sent.
    let lane_count: usize = queues.iter().map(Vec::len).sum();
    let frame_len = templates[0].frame_len();
    let mut flow_lists = flows_per_lane(templates.len(), lane_count).into_iter();
    let mut lanes_per_thread = Vec::new();
    for txs in queues {
        let lanes: Vec<Lane> = txs
            .into_iter()
            .zip(flow_lists.by_ref())
            .filter(|(_, flows)| !flows.is_empty())
            .map(|(tx, flows)| Lane {
                tx,
                flows,
                next_flow: 0,
                bufs: (0..MAX_BATCH).map(|_| vec![0u8; frame_len]).collect(),
                pending: 0,
            })
            .collect();
        if lanes.is_empty() {
            return Err(format!(
                "--flows {} is too few: every sending thread needs a flow of its own (flow f leaves on queue f % {lane_count})",
                templates.len()
            ));
        }
        lanes_per_thread.push(lanes);
    }
    for (t, lanes) in lanes_per_thread.into_iter().enumerate() {
        let t = t as u64;
        // Split count and rate over the threads, the remainder to the first ones.
        let share = |total: u64| total / threads + u64::from(t < total % threads);
        let plan = ThreadPlan {
            index: t,
            threads,
            count: if args.count > 0 {
                share(args.count)
            } else {
                u64::MAX
            },
            rate: share(args.rate),
            unlimited: args.rate == 0,
            deadline,
        };
        if args.count > 0 && plan.count == 0 {
            continue;
        }
        let templates = templates.clone();
        let counters = counters.clone();
        handles.push(std::thread::spawn(move || {
            send_loop(lanes, &templates, &plan, &counters[t as usize], stop)
        }));
    }
    let mut ticker = Ticker::new("gen", args.quiet);
    let totals = |c: &[ThreadCounters]| {
        c.iter().fold((0, 0, 0), |(f, b, x), c| {
            (
                f + c.frames.load(Ordering::Relaxed),
                b + c.bytes.load(Ordering::Relaxed),
                x + c.full.load(Ordering::Relaxed),
            )
        })
    };
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(20));
        let (f, b, _) = totals(&counters);
        ticker.tick(f, b);
    }
    for h in handles {
        h.join().map_err(|_| "a sending thread panicked")?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (frames, bytes, full) = totals(&counters);
    let dropped = match (dropped_before, crate::netns::tx_dropped(&args.iface)) {
        (Some(a), Ok(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    let mut summary = Summary {
        role: "gen".into(),
        mode: args.io.name().into(),
        frames,
        bytes,
        full,
        dropped,
        seconds: elapsed,
        ..Summary::default()
    };
    summary.finish();
    summary.print(args.json);
    Ok(())
}

/// Opens each thread's transmit queues: one per thread, or `--queues-per-thread` AF_XDP
/// sockets with `--io xdp`.
fn open_queues(args: &Args) -> Result<Vec<Vec<Box<dyn TxQueue>>>, String> {
    match args.io {
        Io::Packet => {
            // One small receive ring (the backend always opens one); the kernel keeps its NIC.
            let backend = PacketBackend {
                rx_sockets: 1,
                block_size: 1 << 16,
                block_count: 2,
                block_kernel: false,
                ..PacketBackend::default()
            };
            let ports = backend
                .open(&args.iface, args.threads)
                .map_err(|e| format!("opening {}: {e}", args.iface))?;
            // The receive ring is not needed; only the transmit queues are kept.
            drop(ports.rx);
            Ok(ports.tx.into_iter().map(|q| vec![q]).collect())
        }
        Io::PacketRing => (0..args.threads)
            .map(|_| {
                crate::txring::TxRing::open(&args.iface, 2048)
                    .map(|r| vec![Box::new(r) as Box<dyn TxQueue>])
                    .map_err(|e| format!("PACKET_TX_RING on {}: {e}", args.iface))
            })
            .collect(),
        Io::Xdp => {
            let config = XdpConfig {
                rx_ring_size: 64,
                tx_ring_size: args.xdp_ring,
                zero_copy: true,
                ..XdpConfig::default()
            };
            let per = args.queues_per_thread;
            if per == 0 || per > 64 {
                return Err("--queues-per-thread must be 1..=64".into());
            }
            (0..args.threads as u32)
                .map(|t| {
                    let first = args.queue.saturating_add(t * per);
                    let queues: Vec<u32> = (first..first.saturating_add(per)).collect();
                    let tx = xdp::open_tx_only(&args.iface, &queues, &config)
                        .map_err(|e| format!("AF_XDP on {}: {e}", args.iface))?;
                    Ok(tx
                        .into_iter()
                        .map(|q| Box::new(DrainingXdp(q)) as Box<dyn TxQueue>)
                        .collect())
                })
                .collect()
        }
    }
}

/// One AF_XDP transmit queue whose `flush` waits (bounded) until the kernel has taken every
/// frame from the tx ring, so that the counts are final when the generator ends.
struct DrainingXdp(XdpTxQueue);

impl TxQueue for DrainingXdp {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.0.send(frames)
    }

    fn flush(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.0.pending() > 0 && Instant::now() < deadline {
            self.0.flush();
            if self.0.pending() > 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

/// What one sending thread does.
struct ThreadPlan {
    index: u64,
    threads: u64,
    count: u64,
    rate: u64,
    unlimited: bool,
    deadline: Instant,
}

/// One transmit queue of a sending thread, with the flows that leave on it and the frames
/// stamped for it but not yet taken.
struct Lane {
    tx: Box<dyn TxQueue>,
    /// Indices into the templates; used round-robin.
    flows: Vec<usize>,
    next_flow: usize,
    /// [`MAX_BATCH`] frame buffers.
    bufs: Vec<Vec<u8>>,
    pending: usize,
}

/// Which flows leave on which queue: with `lanes` queues in all (over every thread), flow `f`
/// always leaves on queue `f % lanes`, as a NIC's RSS keeps a flow on one queue (on a veth
/// the transmit queue picks the peer's receive queue, so a flow's frames also arrive on one
/// queue, in order). Returns, per queue, its flows (empty where there are fewer flows than
/// queues).
fn flows_per_lane(flows: usize, lanes: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); lanes];
    for f in 0..flows {
        out[f % lanes].push(f);
    }
    out
}

fn send_loop(
    mut lanes: Vec<Lane>,
    templates: &[FrameTemplate],
    plan: &ThreadPlan,
    counters: &ThreadCounters,
    stop: &AtomicBool,
) {
    let len = templates[0].frame_len();
    let start = Instant::now();
    // Frames stamped so far (sent or waiting in a lane's `bufs[..pending]`).
    let mut stamped: u64 = 0;
    let mut sent: u64 = 0;
    let mut pending_total = 0usize;
    let mut cur = 0usize;
    // `run` gives every thread at least one lane.
    while sent < plan.count && !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= plan.deadline {
            break;
        }
        let nlanes = lanes.len();
        let lane = &mut lanes[cur];
        cur = (cur + 1) % nlanes;
        // How many more frames may be stamped now.
        let mut room = (MAX_BATCH - lane.pending) as u64;
        if !plan.unlimited {
            let due = (now.duration_since(start).as_secs_f64() * plan.rate as f64) as u64 + 1;
            let allowed = due.min(plan.count).saturating_sub(stamped);
            if allowed == 0 && pending_total == 0 {
                // Wait for the next frame's turn: sleep when it is far, else spin.
                let next = Duration::from_secs_f64((stamped) as f64 / plan.rate as f64);
                let wait = (start + next).saturating_duration_since(Instant::now());
                if wait > Duration::from_micros(200) {
                    std::thread::sleep(wait - Duration::from_micros(100));
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            room = room.min(allowed);
        }
        room = room.min(plan.count - stamped);
        if room > 0 {
            let time = probe::now_ns();
            let end = lane.pending + room as usize;
            for buf in lane.bufs[lane.pending..end].iter_mut() {
                let seq = stamped * plan.threads + plan.index;
                templates[lane.flows[lane.next_flow]].stamp(buf, seq as u32, time);
                lane.next_flow = (lane.next_flow + 1) % lane.flows.len();
                stamped += 1;
            }
            lane.pending = end;
            pending_total += room as usize;
        }
        if lane.pending == 0 {
            continue;
        }
        let mut refs: [&[u8]; MAX_BATCH] = [&[]; MAX_BATCH];
        for (r, b) in refs.iter_mut().zip(&lane.bufs[..lane.pending]) {
            *r = b;
        }
        let n = lane.tx.send(&refs[..lane.pending]);
        if n < lane.pending {
            counters.full.fetch_add(1, Ordering::Relaxed);
            lane.bufs[..lane.pending].rotate_left(n);
            if n == 0 {
                std::thread::yield_now();
            }
        }
        lane.pending -= n;
        pending_total -= n;
        sent += n as u64;
        counters.frames.store(sent, Ordering::Relaxed);
        counters.bytes.store(sent * len as u64, Ordering::Relaxed);
    }
    for lane in &mut lanes {
        lane.tx.flush();
    }
    counters.frames.store(sent, Ordering::Relaxed);
    counters.bytes.store(sent * len as u64, Ordering::Relaxed);
}
