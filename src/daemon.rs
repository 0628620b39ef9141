//! The daemon's wiring: claims the NICs, puts the kernel behind the switch, starts the pinned
//! workers and the kernel-side thread, serves the control socket, ages learned kernel rules,
//! and puts everything back on SIGTERM/SIGINT.
//!
//! Threads (per claimed NIC, W = number of cores in `CORES`):
//! - W workers (`usnetd_shards::worker::Worker`), worker `i` pinned to `CORES[i]`, each polling
//!   its share of the NIC's receive queues, transmitting on its own NIC transmit queue and
//!   serving the outgoing side of the client channels it was given;
//! - one kernel-side worker (index W) pinned to `KERNEL_CORE`: it has no NIC receive queue,
//!   serves the TAP (frames the kernel sends: learning of the kernel's flows, the firewall's
//!   memory) and transmits on NIC transmit queue W;
//! - the control thread (the main thread): control socket, client lifetime, ageing of learned
//!   kernel rules, the stats file, signals.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use log::{debug, error, info, warn};
use usnetd_client::protocol::ShmChannelInfo;
use usnetd_shards::counters::{CounterSnapshot, WorkerCounters};
use usnetd_shards::endpoint::{EndpointId, EndpointKind, EndpointSink};
use usnetd_shards::key::{FlowKey, Ip};
use usnetd_shards::port::RxQueue;
use usnetd_shards::snapshot::Origin;
use usnetd_shards::table::Table;
use usnetd_shards::worker::{NicShared, Worker, WorkerCommand, WorkerParts};

use crate::backend::{Backend, NicPorts};
use crate::channel::shm::ShmChannel;
use crate::channel::uds::UdsChannel;
use crate::config::{BackendKind, Config, RpsCores, StaticRule};
use crate::control::{
    bind_control_socket, ChannelFactory, ChannelHandover, ClientLimits, ControlServer, KernelPorts,
    NicControl, SourceAssigner,
};
use crate::host::procnet;
use crate::host::{HostConfig, HostKernel};
use crate::sys::WorkerSched;

/// How often the NIC's routes are checked for ones the kernel put back (link flaps).
const REASSERT_INTERVAL: Duration = Duration::from_secs(5);
/// Slots per shared-memory ring handed to clients.
pub const SHM_SLOTS: usize = 1024;
/// Bytes per shared-memory slot (frames up to the MTU plus headers fit).
pub const SHM_SLOT_SIZE: usize = 2048;

/// Why the daemon stopped with an error.
#[derive(Debug)]
pub struct DaemonError(String);

impl fmt::Display for DaemonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DaemonError {}

fn fail(what: impl fmt::Display, e: impl fmt::Display) -> DaemonError {
    DaemonError(format!("{what}: {e}"))
}

/// An exclusive lock on one NIC of this network namespace: a second usnetd refuses to claim
/// it. The kernel drops the lock when the process ends, SIGKILL included.
struct NicLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl NicLock {
    fn acquire(ifname: &str) -> Result<NicLock, DaemonError> {
        use std::os::unix::fs::MetadataExt;
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        let dir = if Path::new("/run/lock").is_dir() {
            "/run/lock"
        } else {
            "/tmp"
        };
        let path = format!("{dir}/usnetd-{netns}-{ifname}.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| fail(format!("lock file {path}"), e))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(NicLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(DaemonError(format!(
                "bad setting INTERFACES: {ifname} is already claimed by another usnetd (lock {path})"
            ))),
            Err((_, e)) => Err(fail(format!("locking {path}"), e)),
        }
    }
}

/// One claimed NIC while the daemon runs.
struct Nic {
    name: String,
    table: Arc<Mutex<Table>>,
    _shared: Arc<NicShared>,
    kernel: Option<EndpointId>,
    /// Dropped last: restores the kernel's view of the NIC.
    host: Option<HostKernel>,
    /// The queues' owners keep the backend's resources; the guard (XDP link, tc filter,
    /// macvtap) lives in the queues themselves.
    worker_commands: Vec<Sender<WorkerCommand>>,
    counters: Vec<Arc<WorkerCounters>>,
    mtu: usize,
    kernel_ips: Vec<IpAddr>,
    /// The netmap backend, for client pipes (netmap NICs only).
    netmap: NetmapHandle,
    /// PCAP_LOG's file, flushed once a second.
    pcap: Option<Arc<crate::pcap::PcapLog>>,
    /// The kernel's TAP sink (its counters go to stats.json).
    tap_sink: Option<Arc<crate::host::tap::TapSink>>,
    /// The XDP kernel fast path (its counters go to stats.json).
    kernel_pass: Option<Arc<crate::backend::kernel_pass::KernelPass>>,
    /// Held while the NIC is claimed (the last field: dropped last).
    _lock: NicLock,
}

/// Runs the switch until SIGTERM or SIGINT.
pub fn run(config: Config) -> Result<(), DaemonError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| fail("cannot install signal handler", e))?;
    }
    // Checks that need the system but change nothing.
    for ifname in &config.interfaces {
        if !Path::new("/sys/class/net").join(ifname).exists() {
            return Err(DaemonError(format!(
                "bad setting INTERFACES: interface '{ifname}' does not exist"
            )));
        }
    }
    for s in &config.static_uds {
        if !s.path.exists() {
            return Err(DaemonError(format!(
                "bad setting STATIC_UDS: no client socket at {} (start the static client first)",
                s.path.display()
            )));
        }
    }
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|e| fail(format!("STATE_DIR {}", config.state_dir.display()), e))?;

    let workers = config.cores.len();
    let stop_workers = Arc::new(AtomicBool::new(false));
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    let mut nics: Vec<Nic> = Vec::new();
    let result = start_and_serve(&config, &stop, &stop_workers, &mut threads, &mut nics);

    // Shutdown, also after a start-up error: workers first (they hold the queues and thus
    // the backends' guards), then the host side is restored.
    stop_workers.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    for mut nic in nics {
        if let Some(mut host) = nic.host.take() {
            match host.restore() {
                Ok(()) => info!(
                    "restored {}: addresses, routes and links are back",
                    nic.name
                ),
                Err(e) => error!("restoring {} failed: {e}", nic.name),
            }
        }
    }
    let _ = std::fs::remove_file(config.state_dir.join("stats.json"));
    let _ = std::fs::remove_file(&config.control_socket);
    info!("usnetd stopped");
    let _ = workers;
    result
}

fn start_and_serve(
    config: &Config,
    stop: &Arc<AtomicBool>,
    stop_workers: &Arc<AtomicBool>,
    threads: &mut Vec<JoinHandle<()>>,
    nics: &mut Vec<Nic>,
) -> Result<(), DaemonError> {
    let workers = config.cores.len();
    for ifname in &config.interfaces {
        let nic = start_nic(config, ifname, stop_workers, threads)?;
        nics.push(nic);
    }
    let socket = bind_control_socket(&config.control_socket, config.allow_gid).map_err(|e| {
        fail(
            format!("CONTROL_SOCKET {}", config.control_socket.display()),
            e,
        )
    })?;
    let controls: Vec<NicControl> = nics
        .iter()
        .map(|n| NicControl {
            name: n.name.clone(),
            table: n.table.clone(),
        })
        .collect();
    let factory = DaemonChannels {
        mtus: nics.iter().map(|n| (n.name.clone(), n.mtu)).collect(),
        rings: workers + 1,
        netmap: nics
            .iter_mut()
            .map(|n| (n.name.clone(), n.netmap.take()))
            .collect(),
        #[cfg(feature = "netmap")]
        pipe_ids: crate::backend::netmap::pipe::PipeIdPool::dynamic(),
    };
    let assigner = DaemonAssigner {
        workers: nics
            .iter()
            .map(|n| (n.name.clone(), n.worker_commands[..workers].to_vec()))
            .collect(),
        placed: Mutex::new(HashMap::new()),
        next: Mutex::new(0),
    };
    let kernel = DaemonKernelPorts {
        ips: nics
            .iter()
            .map(|n| (n.name.clone(), n.kernel_ips.clone()))
            .collect(),
        with_kernel: !config.no_host_rings,
    };
    let limits = ClientLimits {
        max_channels_per_client: config.max_channels_per_client,
        max_rules_per_client: config.max_rules_per_client,
        ..ClientLimits::default()
    };
    let mut server = ControlServer::new(
        socket,
        controls,
        Box::new(factory),
        Box::new(assigner),
        Box::new(kernel),
        limits,
    )
    .map_err(|e| fail("control socket", e))?;
    info!(
        "ready: {} worker(s) on cores {:?}, kernel side on core {}, scheduling {}, control socket {}",
        workers,
        config.cores,
        config.kernel_core,
        config.worker_sched,
        config.control_socket.display()
    );

    let mut next_age = Instant::now() + config.age_interval;
    let mut next_reassert = Instant::now() + REASSERT_INTERVAL;
    let mut next_stats = Instant::now();
    let stats_path = config.state_dir.join("stats.json");
    while !stop.load(Ordering::SeqCst) {
        if let Err(e) = server.poll_once(Duration::from_millis(100)) {
            warn!("control socket: {e}");
        }
        let now = Instant::now();
        if now >= next_age {
            next_age = now + config.age_interval;
            for nic in nics.iter() {
                age_kernel_rules(nic);
            }
        }
        if now >= next_reassert {
            next_reassert = now + REASSERT_INTERVAL;
            // Routes the kernel put back on a NIC (a link flap recreates prefix routes) go to
            // the TAP again, so the kernel keeps sending through the switch.
            for nic in nics.iter() {
                if let Some(host) = &nic.host {
                    match host.takeover().reassert() {
                        Ok(0) => {}
                        Ok(n) => info!(
                            "{}: moved {n} route(s) that reappeared on the NIC back to the TAP",
                            nic.name
                        ),
                        Err(e) => warn!("{}: checking the NIC's routes: {e}", nic.name),
                    }
                }
            }
        }
        if now >= next_stats {
            next_stats = now + Duration::from_secs(1);
            // A claimed NIC that disappeared (unplugged, its namespace's peer gone): stop,
            // rather than polling queues that can only fail.
            if let Some(nic) = nics
                .iter()
                .find(|n| !Path::new("/sys/class/net").join(&n.name).exists())
            {
                return Err(DaemonError(format!(
                    "interface {} disappeared; stopping",
                    nic.name
                )));
            }
            for p in nics.iter().filter_map(|n| n.pcap.as_ref()) {
                p.flush();
            }
            if let Err(e) = write_stats(&stats_path, nics) {
                debug!("stats file {}: {e}", stats_path.display());
            }
        }
    }
    info!("stopping (signal received)");
    Ok(())
}

/// Whether this NIC is served by netmap (`BACKEND=netmap`, or `auto` with netmap built in
/// and its module loaded).
fn wants_netmap(config: &Config) -> bool {
    match config.backend {
        BackendKind::Netmap => true,
        BackendKind::Auto => cfg!(feature = "netmap") && Path::new("/dev/netmap").exists(),
        _ => false,
    }
}

/// The RPS cores for the TAP (KERNEL_RPS_CORES; by default the online cores that run no
/// worker and are not the kernel-side core).
fn kernel_rps_cores(config: &Config) -> Vec<usize> {
    match &config.kernel_rps_cores {
        RpsCores::Off => Vec::new(),
        RpsCores::Cores(cores) => cores.clone(),
        RpsCores::Auto => {
            let online = crate::host::rps::online_cores().unwrap_or_default();
            crate::host::rps::default_cores(&online, &config.cores, config.kernel_core)
        }
    }
}

/// Chooses and opens a non-netmap backend for one NIC (the kernel is already behind its TAP).
fn open_backend(
    config: &Config,
    ifname: &str,
    tx_queues: usize,
) -> Result<(&'static str, NicPorts), DaemonError> {
    let try_open = |b: &dyn Backend| b.open(ifname, tx_queues).map(|p| (b.name(), p));
    let xdp = crate::backend::xdp::XdpBackend::new(crate::backend::xdp::XdpConfig {
        kernel_pass: kernel_fast_path(config),
        ..Default::default()
    });
    let packet = crate::backend::packet::PacketBackend {
        ring: config.packet_ring,
        ..Default::default()
    };
    let macvtap = crate::backend::macvtap::MacvtapBackend {
        queues: config.cores.len(),
        io_uring: !config.no_io_uring,
        ..Default::default()
    };
    match config.backend {
        BackendKind::Xdp => try_open(&xdp).map_err(|e| fail(format!("BACKEND=xdp on {ifname}"), e)),
        BackendKind::Packet => {
            try_open(&packet).map_err(|e| fail(format!("BACKEND=packet on {ifname}"), e))
        }
        BackendKind::Macvtap => {
            try_open(&macvtap).map_err(|e| fail(format!("BACKEND=macvtap on {ifname}"), e))
        }
        BackendKind::Netmap | BackendKind::Auto => match try_open(&xdp) {
            Ok(p) => {
                info!("BACKEND=auto: using xdp on {ifname} (netmap not available)");
                Ok(p)
            }
            Err(e) => {
                warn!("BACKEND=auto: xdp on {ifname} failed ({e}), using packet");
                try_open(&packet).map_err(|e| fail(format!("BACKEND=auto (packet) on {ifname}"), e))
            }
        },
    }
}

/// Whether the kernel's fast path is on (`backend::kernel_pass`; both halves with the XDP
/// backend, the egress half with the others): unless NO_KERNEL_FAST_PATH, and not without a
/// kernel side (NO_HOST_RINGS) or with PCAP_LOG (the passed frames would be missing from the
/// log).
fn kernel_fast_path(config: &Config) -> bool {
    !config.no_kernel_fast_path && !config.no_host_rings && config.pcap_log.is_none()
}

/// The egress half of the kernel's fast path: the kernel's frames of its own rules leave
/// `ifname` from its TAP's egress without the switch (`backend::kernel_pass`). Attached after
/// the rule mirror, which holds the local MACs by then. Without it (a kernel before tcx, 6.6),
/// those frames take the switch's path, which is only slower.
fn attach_kernel_egress(kp: &crate::backend::kernel_pass::KernelPass, ifname: &str) {
    use crate::backend::sysutil::if_nametoindex;
    let tap = crate::host::tap::tap_name_for(ifname);
    let attached = if_nametoindex(&tap)
        .and_then(|t| Ok((t, if_nametoindex(ifname)?)))
        .and_then(|(t, n)| kp.attach_egress(t, n));
    match attached {
        Ok(true) => info!(
            "kernel fast path: the kernel's frames of its rules leave {ifname} from {tap}'s \
             egress (tcx)"
        ),
        Ok(false) => {}
        Err(e) => warn!(
            "kernel fast path: egress half not attached ({e}); the kernel's frames take the \
             switch's path"
        ),
    }
}

/// The kernel's way in and out when netmap serves the NIC: its host rings.
type KernelPath = (Arc<dyn EndpointSink>, Vec<Box<dyn RxQueue>>);

/// netmap's part of one NIC: the backend (for client pipes) and, unless NO_HOST_RINGS, the
/// kernel's host rings.
#[cfg(feature = "netmap")]
fn open_netmap(
    config: &Config,
    ifname: &str,
    tx_queues: usize,
) -> Result<(NicPorts, Option<KernelPath>, NetmapHandle), DaemonError> {
    let b = crate::backend::netmap::NetmapBackend::new(!config.no_zero_copy);
    let ports = b
        .open(ifname, tx_queues)
        .map_err(|e| fail(format!("BACKEND=netmap on {ifname}"), e))?;
    let kernel = if config.no_host_rings {
        None
    } else {
        let h = b
            .open_host_rings(ifname)
            .map_err(|e| fail(format!("netmap host rings of {ifname}"), e))?;
        Some((h.sink, vec![h.source]))
    };
    Ok((ports, kernel, Some(b)))
}

#[cfg(not(feature = "netmap"))]
fn open_netmap(
    _config: &Config,
    ifname: &str,
    _tx_queues: usize,
) -> Result<(NicPorts, Option<KernelPath>, NetmapHandle), DaemonError> {
    Err(DaemonError(format!(
        "BACKEND=netmap on {ifname}: netmap support is not built in"
    )))
}

/// The netmap backend of a NIC, kept for client pipes (`None`: not a netmap NIC).
#[cfg(feature = "netmap")]
type NetmapHandle = Option<crate::backend::netmap::NetmapBackend>;
/// Without the `netmap` feature there is nothing to keep.
#[cfg(not(feature = "netmap"))]
type NetmapHandle = Option<std::convert::Infallible>;

fn start_nic(
    config: &Config,
    ifname: &str,
    stop_workers: &Arc<AtomicBool>,
    threads: &mut Vec<JoinHandle<()>>,
) -> Result<Nic, DaemonError> {
    let workers = config.cores.len();
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{ifname}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(1500);
    let kernel_ips =
        nic_addresses(ifname).map_err(|e| fail(format!("reading the addresses of {ifname}"), e))?;

    // Leftovers of a crashed run first (a macvtap, then the kernel's side, which
    // `HostKernel::start` repairs), then the kernel's side, then the NIC.
    let lock = NicLock::acquire(ifname)?;
    crate::backend::macvtap::remove_stale(ifname)
        .map_err(|e| fail(format!("removing a stale macvtap on {ifname}"), e))?;
    // The TAP's sink, for its counters in stats.json (none with netmap or NO_HOST_RINGS).
    let mut tap_sinks: Vec<Arc<crate::host::tap::TapSink>> = Vec::new();
    let (backend, ports, host, kernel_path, netmap): (_, _, _, Option<KernelPath>, NetmapHandle) =
        if wants_netmap(config) {
            // netmap's host rings are the kernel's path: the kernel keeps the NIC.
            let (ports, kernel_path, netmap) = open_netmap(config, ifname, workers + 1)?;
            ("netmap", ports, None, kernel_path, netmap)
        } else {
            let host = if config.no_host_rings {
                None
            } else {
                let mut hc = HostConfig::new(ifname);
                hc.queues = workers + 1;
                hc.state_dir = config.state_dir.clone();
                // vnet headers both ways: TCP super-segments pass whole between the NIC
                // and the kernel (see ARCHITECTURE.md, "Large segments").
                hc.offload = true;
                hc.coalesce = !config.no_coalesce;
                hc.io_uring = !config.no_io_uring;
                hc.rps_cores = kernel_rps_cores(config);
                let host = HostKernel::start(&hc).map_err(|e| {
                    fail(
                        format!("putting the kernel of {ifname} behind the switch"),
                        e,
                    )
                })?;
                Some(host)
            };
            let (backend, ports) = match open_backend(config, ifname, workers + 1) {
                Ok(p) => p,
                Err(e) => {
                    if let Some(mut h) = host {
                        let _ = h.restore();
                    }
                    return Err(e);
                }
            };
            // The kernel's TCP super-segments travel whole: they leave whole where the NIC's
            // transmit queue takes them at that moment (packet with TSO on, macvtap), and the
            // kernel-side worker cuts them otherwise.
            let kernel_path = host.as_ref().map(|h| {
                let tap_sink = h.sink();
                tap_sinks.push(tap_sink.clone());
                let sink: Arc<dyn EndpointSink> = tap_sink;
                let sources: Vec<Box<dyn RxQueue>> = h
                    .rx_queues_whole()
                    .into_iter()
                    .map(|q| Box::new(q) as Box<dyn RxQueue>)
                    .collect();
                (sink, sources)
            });
            (backend, ports, host, kernel_path, None)
        };
    let NicPorts {
        mut rx,
        mut tx,
        kernel_pass,
    } = ports;
    // Without the XDP program (packet, macvtap), the egress half alone: the kernel's frames of
    // its rules still leave from its TAP's egress straight out of the NIC.
    let kernel_pass = match kernel_pass {
        None if host.is_some() && kernel_fast_path(config) => {
            match crate::backend::kernel_pass::KernelPass::create(
                crate::backend::kernel_pass::DEFAULT_MAX_RULES,
            ) {
                Ok(kp) => Some(Arc::new(kp)),
                Err(e) => {
                    warn!("kernel fast path: no BPF maps ({e}); the kernel's frames take the switch's path");
                    None
                }
            }
        }
        other => other,
    };
    let pcap = match &config.pcap_log {
        Some(path) => {
            // One file per NIC: the path as given for the first, `<path>.<IF>` for others.
            let path = if config.interfaces.first().map(String::as_str) == Some(ifname) {
                path.clone()
            } else {
                PathBuf::from(format!("{}.{ifname}", path.display()))
            };
            let log = crate::pcap::PcapLog::create(&path)
                .map_err(|e| fail(format!("PCAP_LOG {}", path.display()), e))?;
            info!(
                "PCAP_LOG: copying every frame of {ifname} to {}",
                path.display()
            );
            rx = rx
                .into_iter()
                .map(|q| {
                    Box::new(crate::pcap::PcapRx {
                        inner: q,
                        log: log.clone(),
                    }) as Box<dyn RxQueue>
                })
                .collect();
            tx = tx
                .into_iter()
                .map(|q| {
                    Box::new(crate::pcap::PcapTx {
                        inner: q,
                        log: log.clone(),
                    }) as Box<dyn usnetd_shards::port::TxQueue>
                })
                .collect();
            Some(log)
        }
        None => None,
    };
    let kernel_desc = match (&host, &kernel_path) {
        (Some(_), _) => format!("behind TAP {}", crate::host::tap::tap_name_for(ifname)),
        (None, Some(_)) => "on the netmap host rings".to_string(),
        (None, None) => "cut off (NO_HOST_RINGS)".to_string(),
    };
    info!(
        "claimed {ifname}: backend {backend}, {} receive queue(s), mtu {mtu}, kernel {kernel_desc}",
        rx.len()
    );

    let mut table = Table::new();
    let (kernel, kernel_sources) = match kernel_path {
        Some((sink, sources)) => (
            Some(table.add_endpoint(EndpointKind::Kernel, "kernel".into(), sink)),
            sources,
        ),
        None => (None, Vec::new()),
    };
    if let Some(k) = kernel {
        for rule in config.debug_ports.iter().filter(|r| r.interface == ifname) {
            for key in static_keys(rule, &kernel_ips) {
                if let Err(e) = table.add_rule(key, k, Origin::Static) {
                    warn!("DEBUG_PORTS rule {key:?}: {e}");
                }
            }
        }
        for mac in &config.add_macs {
            table.add_mac(*mac, k);
        }
    }
    // The fast path's map follows the kernel's rules from here on (DEBUG_PORTS replayed now,
    // learned rules as they come), always before the table publishes them.
    let kernel_pass = match (kernel_pass, kernel) {
        (Some(kp), Some(k)) => {
            table.set_rule_observer(Box::new(
                crate::backend::kernel_pass::KernelPassMirror::new(k, kp.clone()),
            ));
            if host.is_some() {
                attach_kernel_egress(&kp, ifname);
            }
            Some(kp)
        }
        _ => None,
    };
    let mut static_sources: Vec<(EndpointId, Box<dyn RxQueue>)> = Vec::new();
    for (n, s) in config
        .static_uds
        .iter()
        .filter(|s| s.rule.interface == ifname)
        .enumerate()
    {
        let (sink, source) = open_static_uds(&s.path, mtu)
            .map_err(|e| fail(format!("STATIC_UDS {}", s.path.display()), e))?;
        let ep = table.add_endpoint(
            EndpointKind::Client,
            format!("static-uds-{n}"),
            Arc::new(sink),
        );
        for key in static_keys(&s.rule, &kernel_ips) {
            table
                .add_rule(key, ep, Origin::Static)
                .map_err(|e| fail(format!("STATIC_UDS rule {key:?}"), e))?;
        }
        static_sources.push((ep, Box::new(source)));
    }
    static_pipes(
        config,
        ifname,
        &netmap,
        &kernel_ips,
        &mut table,
        &mut static_sources,
    )?;
    table.publish();
    let table = Arc::new(Mutex::new(table));
    let shared = Arc::new(NicShared::new());

    // Receive queues spread round-robin over the workers; transmit queue i to worker i, the
    // last one to the kernel side.
    let mut rx_per_worker: Vec<Vec<Box<dyn RxQueue>>> = (0..workers).map(|_| Vec::new()).collect();
    for (i, q) in rx.into_iter().enumerate() {
        rx_per_worker[i % workers].push(q);
    }
    if tx.len() < workers + 1 {
        return Err(DaemonError(format!(
            "backend {backend} gave {} transmit queues, {} needed",
            tx.len(),
            workers + 1
        )));
    }
    let mut tx = tx.into_iter();
    let mut worker_commands = Vec::new();
    let mut counters = Vec::new();
    for (i, nic_rx) in rx_per_worker.into_iter().enumerate() {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let c = Arc::new(WorkerCounters::new());
        let worker = Worker::new(WorkerParts {
            id: i,
            nic_rx,
            nic_tx: tx.next().expect("checked above"),
            table: table.clone(),
            nic: shared.clone(),
            counters: c.clone(),
            commands: cmd_rx,
        });
        threads.push(spawn_worker(
            format!("usnetd-w{i}-{ifname}"),
            config.cores[i],
            worker
                .with_idle_spin(config.idle_spin)
                .with_batch_wait(config.batch_wait),
            config.worker_sched,
            stop_workers.clone(),
        )?);
        worker_commands.push(cmd_tx);
        counters.push(c);
    }
    // Static clients' outgoing frames: spread over the workers like dynamic ones.
    for (n, (ep, src)) in static_sources.into_iter().enumerate() {
        let _ = worker_commands[n % workers].send(WorkerCommand::AttachSource(ep, src));
    }
    // The kernel side.
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let c = Arc::new(WorkerCounters::new());
    let kernel_worker = Worker::new(WorkerParts {
        id: workers,
        nic_rx: Vec::new(),
        nic_tx: tx.next().expect("checked above"),
        table: table.clone(),
        nic: shared.clone(),
        counters: c.clone(),
        commands: cmd_rx,
    });
    if let Some(k) = kernel {
        for q in kernel_sources {
            let _ = cmd_tx.send(WorkerCommand::AttachSource(k, q));
        }
    }
    threads.push(spawn_worker(
        format!("usnetd-k-{ifname}"),
        config.kernel_core,
        kernel_worker
            .with_idle_spin(config.idle_spin)
            .with_batch_wait(config.batch_wait),
        config.worker_sched,
        stop_workers.clone(),
    )?);
    worker_commands.push(cmd_tx);
    counters.push(c);

    Ok(Nic {
        name: ifname.to_string(),
        table,
        _shared: shared,
        kernel,
        host,
        worker_commands,
        counters,
        mtu,
        kernel_ips,
        netmap,
        pcap,
        tap_sink: tap_sinks.pop(),
        kernel_pass,
        _lock: lock,
    })
}

/// Starts a worker thread pinned to `core` with the scheduling policy `sched`; returns once
/// the thread runs with both, or the error (a policy the kernel refused) without leaving the
/// thread behind.
fn spawn_worker(
    name: String,
    core: usize,
    worker: Worker,
    sched: WorkerSched,
    stop: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, DaemonError> {
    let (started_tx, started_rx) = std::sync::mpsc::sync_channel(1);
    let thread_name = name.clone();
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            if !core_affinity::set_for_current(core_affinity::CoreId { id: core }) {
                warn!("{name}: could not pin to core {core}");
            }
            if let Err(e) = sched.apply_to_current_thread() {
                let _ = started_tx.send(Err(e));
                return;
            }
            let _ = started_tx.send(Ok(()));
            debug!("{name} running on core {core}, scheduling {sched}");
            let mut worker = worker.with_idle_wait(Box::new(crate::sys::PollWaiter::default()));
            worker.run(&stop);
        })
        .map_err(|e| fail("starting a worker thread", e))?;
    match started_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(fail(format!("WORKER_SCHED {sched} for {thread_name}"), e))
        }
        Err(_) => {
            let _ = handle.join();
            Err(fail(
                format!("starting {thread_name}"),
                "the thread ended before it ran",
            ))
        }
    }
}

/// The keys of a static rule (DEBUG_PORTS, STATIC_UDS): one per kernel address of the
/// rule's family (the original took only the first address).
fn static_keys(rule: &StaticRule, ips: &[IpAddr]) -> Vec<FlowKey> {
    ips.iter()
        .filter(|ip| match rule.remote {
            Some(r) => r.is_ipv4() == ip.is_ipv4(),
            None => match rule.port.protocol {
                usnetd_shards::key::proto::ICMP => ip.is_ipv4(),
                usnetd_shards::key::proto::ICMPV6 => ip.is_ipv6(),
                _ => true,
            },
        })
        .map(|ip| FlowKey {
            local_ip: Ip::from(*ip),
            remote_ip: rule.remote.map(Ip::from).unwrap_or(Ip::UNSPECIFIED),
            local_port: rule.port.port,
            remote_port: 0,
            proto: rule.port.protocol,
        })
        .collect()
}

/// The NIC's IPv4 and IPv6 addresses (global and link-local), from `ip -json addr`.
fn nic_addresses(ifname: &str) -> io::Result<Vec<IpAddr>> {
    let out = std::process::Command::new("ip")
        .args(["-json", "addr", "show", "dev", ifname])
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(io::Error::other)?;
    let mut ips = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let Some(ip) = a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) {
                ips.push(ip);
            }
        }
    }
    Ok(ips)
}

/// STATIC_PIPES of `ifname`: a netmap pipe per entry (ids from 4094 down, as in the
/// original), its switch end an endpoint with the entry's rule. The client opens the master
/// end (`netmap:IF{N`) itself.
#[cfg(feature = "netmap")]
fn static_pipes(
    config: &Config,
    ifname: &str,
    netmap: &NetmapHandle,
    kernel_ips: &[IpAddr],
    table: &mut Table,
    sources: &mut Vec<(EndpointId, Box<dyn RxQueue>)>,
) -> Result<(), DaemonError> {
    let entries: Vec<&StaticRule> = config
        .static_pipes
        .iter()
        .filter(|r| r.interface == ifname)
        .collect();
    if entries.is_empty() {
        return Ok(());
    }
    let Some(backend) = netmap else {
        return Err(DaemonError(format!(
            "bad setting STATIC_PIPES: {ifname} is not served by the netmap backend"
        )));
    };
    let pool = crate::backend::netmap::pipe::PipeIdPool::static_pipes();
    for rule in entries {
        let (_nmreq, handover) = backend
            .create_pipe(&pool, ifname)
            .map_err(|e| fail("STATIC_PIPES", e))?;
        let ep = table.add_endpoint(
            EndpointKind::Client,
            format!("static-pipe-{ifname}"),
            handover.sink,
        );
        for key in static_keys(rule, kernel_ips) {
            table
                .add_rule(key, ep, Origin::Static)
                .map_err(|e| fail(format!("STATIC_PIPES rule {key:?}"), e))?;
        }
        sources.push((ep, handover.source));
        // The pipe id lease and the master fd: the lease lives in the sink and source too.
        drop(handover.keep);
    }
    Ok(())
}

#[cfg(not(feature = "netmap"))]
fn static_pipes(
    config: &Config,
    ifname: &str,
    _netmap: &NetmapHandle,
    _kernel_ips: &[IpAddr],
    _table: &mut Table,
    _sources: &mut Vec<(EndpointId, Box<dyn RxQueue>)>,
) -> Result<(), DaemonError> {
    if config.static_pipes.iter().any(|r| r.interface == ifname) {
        return Err(DaemonError(
            "bad setting STATIC_PIPES: netmap support is not built in".into(),
        ));
    }
    Ok(())
}

/// A static Unix datagram channel: the switch binds `<PATH>.switch` and sends to `PATH`.
fn open_static_uds(
    path: &Path,
    mtu: usize,
) -> io::Result<(crate::channel::uds::UdsSink, crate::channel::uds::UdsSource)> {
    use std::os::unix::net::UnixDatagram;
    let mut own = path.as_os_str().to_owned();
    own.push(".switch");
    let own = PathBuf::from(own);
    let _ = std::fs::remove_file(&own);
    let sock = UnixDatagram::bind(&own)?;
    sock.connect(path)?;
    UdsChannel::from_switch_end(OwnedFd::from(sock), mtu)
}

/// Removes learned kernel rules whose local TCP/UDP port has no kernel socket any more, and
/// all learned portless kernel rules (ICMP).
fn age_kernel_rules(nic: &Nic) {
    let Some(kernel) = nic.kernel else { return };
    let sockets = match procnet::KernelSockets::read(Path::new("/proc/net")) {
        Ok(s) => s,
        Err(e) => {
            warn!("ageing on {}: cannot read /proc/net: {e}", nic.name);
            return;
        }
    };
    let mut table = nic.table.lock().unwrap_or_else(|p| p.into_inner());
    let removed = table.age_learned(kernel, &mut |k: &FlowKey| {
        usnetd_shards::key::proto::has_ports(k.proto)
            && sockets.has_local_port(k.proto, k.local_ip, k.local_port)
    });
    if removed > 0 {
        table.publish();
        info!("aged {removed} learned kernel rule(s) on {}", nic.name);
    }
}

/// Writes every worker's counters as JSON (read by `tools/demo` and operators).
fn write_stats(path: &Path, nics: &[Nic]) -> io::Result<()> {
    let mut out = serde_json::Map::new();
    for nic in nics {
        let per_worker: Vec<serde_json::Value> = nic
            .counters
            .iter()
            .map(|c| counters_json(&c.snapshot()))
            .collect();
        let (rules, macs, macs_refused) = nic
            .table
            .lock()
            .map(|t| (t.rule_count(), t.mac_count(), t.macs_refused()))
            .unwrap_or_default();
        let mut entry = serde_json::json!({
            "rules": rules,
            "local_macs": macs,
            "macs_refused": macs_refused,
            "workers": per_worker,
        });
        if let Some(tap) = &nic.tap_sink {
            entry["kernel_tap"] = serde_json::json!({
                "coalescing": tap.coalescing(),
                "super_packets": tap.super_packets(),
                "coalesced_frames": tap.coalesced_frames(),
                "refused": tap.refused(),
                "io_uring": tap.io_uring(),
                "ring_writes": tap.ring_writes(),
            });
        }
        if let Some(kp) = &nic.kernel_pass {
            use std::sync::atomic::Ordering::Relaxed;
            let counts = kp.counters.read().unwrap_or_default();
            entry["kernel_fast_path"] = serde_json::json!({
                "rules": kp.stats.rules.load(Relaxed),
                "refused": kp.stats.refused.load(Relaxed),
                "frames_by_connection_rules": counts.in_by_connection_rules,
                "frames_by_listening_rules": counts.in_by_listening_rules,
                "egress": kp.egress_state(),
                "local_macs": kp.stats.macs.load(Relaxed),
                "frames_out_by_connection_rules": counts.out_by_connection_rules,
                "frames_out_by_listening_rules": counts.out_by_listening_rules,
            });
        }
        out.insert(nic.name.clone(), entry);
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&serde_json::Value::Object(out))?,
    )?;
    std::fs::rename(tmp, path)
}

fn counters_json(s: &CounterSnapshot) -> serde_json::Value {
    let drops: serde_json::Map<String, serde_json::Value> =
        usnetd_shards::counters::DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), s.dropped(*r).into()))
            .collect();
    serde_json::json!({
        "frames_in": s.frames_in,
        "bytes_in": s.bytes_in,
        "frames_out": s.frames_out,
        "bytes_out": s.bytes_out,
        "delivered": s.total_delivered(),
        "drops": drops,
        "ring_drops": s.ring_drops,
    })
}

/// Makes packet channels for the control server.
struct DaemonChannels {
    mtus: HashMap<String, usize>,
    rings: usize,
    /// netmap NICs' backends, for RequestNetmapPipe.
    #[cfg_attr(not(feature = "netmap"), allow(dead_code))]
    netmap: HashMap<String, NetmapHandle>,
    /// Dynamic pipe ids (given back when a client's channel is dropped).
    #[cfg(feature = "netmap")]
    pipe_ids: Arc<crate::backend::netmap::pipe::PipeIdPool>,
}

impl ChannelFactory for DaemonChannels {
    #[cfg(feature = "netmap")]
    fn create_netmap_pipe(&self, nic: &str) -> io::Result<(Vec<u8>, ChannelHandover)> {
        match self.netmap.get(nic) {
            Some(Some(backend)) => backend.create_pipe(&self.pipe_ids, nic),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{nic} is not served by netmap"),
            )),
        }
    }

    fn create_uds(&self, nic: &str) -> io::Result<ChannelHandover> {
        let mtu = *self
            .mtus
            .get(nic)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown interface"))?;
        let (client, sink, source) = UdsChannel::pair(mtu)?;
        Ok(ChannelHandover {
            client_fds: vec![client],
            sink: Arc::new(sink),
            source: Box::new(source),
            hangup: None,
            keep: None,
        })
    }

    fn create_shm(&self, nic: &str) -> io::Result<(ShmChannelInfo, ChannelHandover)> {
        if !self.mtus.contains_key(nic) {
            return Err(io::Error::new(io::ErrorKind::NotFound, "unknown interface"));
        }
        let (handover, sink, source) = ShmChannel::create(self.rings, SHM_SLOTS, SHM_SLOT_SIZE)?;
        let geometry = usnetd_client::shm::ShmGeometry::new(
            self.rings as u32,
            SHM_SLOTS as u32,
            SHM_SLOT_SIZE as u32,
            (SHM_SLOT_SIZE as u32) - usnetd_client::shm::SLOT_HEADER_SIZE,
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        let info = ShmChannelInfo {
            version: usnetd_client::shm::SHM_VERSION,
            map_size: geometry.total_size(),
            to_client_rings: self.rings as u32,
            to_switch_rings: 1,
            slots: SHM_SLOTS as u32,
            slot_size: SHM_SLOT_SIZE as u32,
        };
        let hangup = None;
        Ok((
            info,
            ChannelHandover {
                client_fds: vec![
                    handover.memfd,
                    handover.to_client_event,
                    handover.to_switch_event,
                ],
                sink: Arc::new(sink),
                source: Box::new(source),
                hangup,
                keep: None,
            },
        ))
    }
}

/// Gives client channels' outgoing sides to the workers, round-robin.
struct DaemonAssigner {
    workers: HashMap<String, Vec<Sender<WorkerCommand>>>,
    placed: Mutex<HashMap<(String, EndpointId), usize>>,
    next: Mutex<usize>,
}

impl SourceAssigner for DaemonAssigner {
    fn attach(&self, nic: &str, endpoint: EndpointId, source: Box<dyn RxQueue>) {
        let Some(ws) = self.workers.get(nic) else {
            return;
        };
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let w = *next % ws.len();
        *next = next.wrapping_add(1);
        if ws[w]
            .send(WorkerCommand::AttachSource(endpoint, source))
            .is_ok()
        {
            self.placed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((nic.to_string(), endpoint), w);
        }
    }

    fn detach(&self, nic: &str, endpoint: EndpointId) {
        let placed = self
            .placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(nic.to_string(), endpoint));
        if let (Some(w), Some(ws)) = (placed, self.workers.get(nic)) {
            let _ = ws[w].send(WorkerCommand::DetachSource(endpoint));
        }
    }
}

/// What the host kernel uses, from /proc, for the control server's validation.
struct DaemonKernelPorts {
    ips: HashMap<String, Vec<IpAddr>>,
    with_kernel: bool,
}

impl KernelPorts for DaemonKernelPorts {
    fn kernel_listens(&self, proto: u8, ip: IpAddr, port: u16) -> bool {
        if !self.with_kernel {
            return false;
        }
        let ip = Ip::from(ip);
        let any = if ip.is_v4() {
            Ip::v4([0; 4])
        } else {
            Ip::UNSPECIFIED
        };
        // TCP: listening sockets through sock_diag (reading /proc/net/tcp walks every
        // connection, milliseconds per read); UDP: any bound socket, from /proc/net/udp{,6}.
        // When the kernel's sockets cannot be read, refuse rather than risk taking its port.
        match proto {
            usnetd_shards::key::proto::TCP => match crate::host::sockdiag::tcp_listeners() {
                Ok(l) => l
                    .iter()
                    .any(|&(a, p)| p == port && (a == ip || a == any || a.is_unspecified())),
                Err(_) => true,
            },
            usnetd_shards::key::proto::UDP => {
                match procnet::KernelSockets::read_udp(Path::new("/proc/net")) {
                    Ok(s) => s.has_local_port(proto, ip, port),
                    Err(_) => true,
                }
            }
            _ => false,
        }
    }

    fn ephemeral_range(&self) -> (u16, u16) {
        procnet::read_port_range(Path::new("/proc/sys/net/ipv4/ip_local_port_range"))
            .map(|r| (*r.start(), *r.end()))
            .unwrap_or((32768, 60999))
    }

    fn is_kernel_ip(&self, nic: &str, ip: IpAddr) -> bool {
        self.with_kernel && self.ips.get(nic).is_some_and(|v| v.contains(&ip))
    }
}
