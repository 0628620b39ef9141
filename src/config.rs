//! Configuration: the original's settings (config file or environment, environment wins) plus
//! what a multi-core deployment needs.
//!
//! Everything is parsed and checked before the daemon touches the system, so a bad setting
//! stops start-up with a message naming the setting and what is wrong.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use usnetd_shards::key::proto;

/// Every setting the daemon reads, in the order `--help` lists them.
pub const SETTINGS: &[(&str, &str)] = &[
    ("INTERFACES", "<required> NIC interfaces to claim, separated by commas"),
    ("ALLOW_GID", "group id that may use the control socket (mode 0770)"),
    (
        "DEBUG_PORTS",
        "ports opened for the kernel: <IF>:<TCP:PORT|UDP:PORT|ICMP|ICMPV6>[:<REMOTEIP>],...",
    ),
    (
        "STATIC_PIPES",
        "static netmap pipes (netmap builds): <IF>:<TCP:PORT|UDP:PORT|ICMP>[:<REMOTEIP>],... pipe ids from 4094 down",
    ),
    (
        "STATIC_UDS",
        "static Unix datagram channels: <IF>:<TCP:PORT|UDP:PORT|ICMP>[:<REMOTEIP>]@<SOCKET PATH>,...",
    ),
    ("ADD_MACS", "extra local MACs (endpoints that never send), separated by commas"),
    ("NO_HOST_RINGS", "'true': the kernel gets no frames from the NIC (no TAP / host rings)"),
    ("NO_ZERO_COPY", "'true': netmap copies instead of swapping buffers"),
    (
        "NO_COALESCE",
        "'true': write every frame for the kernel to its TAP on its own, instead of consecutive UDP datagrams or in-order TCP segments of one flow as one super-packet (GSO metadata) that the kernel takes like its own GRO's",
    ),
    (
        "NO_IO_URING",
        "'true': one system call per frame: write frames for the kernel to its TAP with a writev(2) each and read a macvtap queue with a read(2) each, instead of submitting a worker's writes (or reads) of a batch through its own io_uring with one system call (used where the kernel allows it)",
    ),
    (
        "NO_KERNEL_FAST_PATH",
        "'true': every frame to and from the kernel takes the switch's path, instead of the kernel's fast path: TCP/UDP frames of the kernel's own rules (learned flows, DEBUG_PORTS; IPv4 unfragmented, IPv6 without extension headers) go from the NIC straight to the kernel's stack (BACKEND=xdp: the XDP program) and from the kernel's TAP straight out of the NIC (every backend with a TAP: a tcx program; not to a local endpoint's MAC); PCAP_LOG turns the fast path off too",
    ),
    ("PCAP_LOG", "pcap file that receives a copy of every frame from and to the NICs"),
    ("RUST_LOG", "log level: error, warn, info, debug, trace"),
    ("CORES", "worker cores in taskset syntax (e.g. 2-5,8); one worker per core [default: 0]"),
    ("KERNEL_CORE", "core that serves the kernel side [default: the first of CORES]"),
    (
        "KERNEL_RPS_CORES",
        "cores where the kernel processes frames the switch writes into the TAP (RPS), taskset syntax, or 'off' [default: the online cores outside CORES and KERNEL_CORE; off when there are none]",
    ),
    (
        "IDLE_SPIN_US",
        "microseconds a worker keeps polling after its last frame before it sleeps (spinning saves wake-ups on dedicated cores, delays other threads on shared ones) [default: 0]",
    ),
    (
        "BATCH_WAIT_US",
        "microseconds a worker waits after a poll that found frames, but less than a full batch, before it polls again, while traffic is dense (at least one frame per wait since the previous poll that found frames), so that frames come in batches (like a NIC's adaptive interrupt moderation): fewer wake-ups and system calls per frame, and a flow's frames reach the kernel in one write; adds up to that much latency under load, none to a lone frame [default: 0]",
    ),
    (
        "WORKER_SCHED",
        "how the kernel schedules the workers and the kernel-side thread: normal, slice:MICROSECONDS (a shorter EEVDF slice: woken workers preempt busy threads sooner) or fifo:PRIORITY (SCHED_FIFO: at once; under overload a worker holds its core up to the real-time throttling limit) [default: normal]",
    ),
    ("BACKEND", "NIC access: auto, netmap, xdp, packet, macvtap [default: auto]"),
    (
        "PACKET_RING",
        "packet backend's receive ring: frames (TPACKET_V2, lowest latency) or blocks (TPACKET_V3, handed over per block, up to 1 ms later at low rates) [default: frames]",
    ),
    ("CONTROL_SOCKET", "control socket path [default: /run/usnetd.socket]"),
    ("STATE_DIR", "where host state is saved for repair after a crash [default: /run/usnetd]"),
    ("AGE_INTERVAL", "seconds between ageing rounds of learned kernel rules [default: 90]"),
    ("MAX_RULES_PER_CLIENT", "rules one client may hold [default: 4096]"),
    ("MAX_CHANNELS_PER_CLIENT", "packet channels one client may hold [default: 8]"),
];

/// A configuration error: which setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The setting's name (`INTERFACES`, ...) or the config file's path.
    pub setting: String,
    /// What is wrong.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad setting {}: {}", self.setting, self.problem)
    }
}

impl std::error::Error for ConfigError {}

fn err(setting: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.to_string(),
        problem: problem.into(),
    }
}

/// KERNEL_RPS_CORES: where the kernel processes the frames the switch writes into the TAP
/// (see `host::rps`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RpsCores {
    /// The online cores outside CORES and KERNEL_CORE; off when there are none.
    Auto,
    /// Off: the kernel processes each frame inside the worker's write.
    Off,
    /// These cores.
    Cores(Vec<usize>),
}

/// Which NIC backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The best one that works: netmap (if built in and the module is loaded), then AF_XDP,
    /// then AF_PACKET.
    Auto,
    /// netmap hardware rings (cargo feature `netmap`).
    Netmap,
    /// AF_XDP, one socket per receive queue.
    Xdp,
    /// AF_PACKET rings (TPACKET_V2 or V3, see PACKET_RING) in a fanout group.
    Packet,
    /// A macvtap device in passthru mode.
    Macvtap,
}

impl BackendKind {
    fn parse(s: &str) -> Result<BackendKind, ConfigError> {
        match s.trim() {
            "" | "auto" => Ok(BackendKind::Auto),
            "netmap" => Ok(BackendKind::Netmap),
            "xdp" => Ok(BackendKind::Xdp),
            "packet" => Ok(BackendKind::Packet),
            "macvtap" => Ok(BackendKind::Macvtap),
            other => Err(err(
                "BACKEND",
                format!(
                    "unknown backend '{other}' (expected auto, netmap, xdp, packet or macvtap)"
                ),
            )),
        }
    }

    /// The name as written in the setting.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Netmap => "netmap",
            BackendKind::Xdp => "xdp",
            BackendKind::Packet => "packet",
            BackendKind::Macvtap => "macvtap",
        }
    }
}

/// The L4 part of a static rule (`TCP:22`, `UDP:53`, `ICMP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticPort {
    /// IP protocol number.
    pub protocol: u8,
    /// Local port (0 for ICMP).
    pub port: u16,
}

/// One entry of DEBUG_PORTS, STATIC_PIPES or STATIC_UDS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticRule {
    /// The interface the rule belongs to.
    pub interface: String,
    /// Protocol and local port.
    pub port: StaticPort,
    /// Only frames from this remote address match, if given.
    pub remote: Option<IpAddr>,
}

/// A static Unix datagram channel: frames matching `rule` are sent to the socket at `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaticUds {
    /// The rule.
    pub rule: StaticRule,
    /// The client's bound Unix datagram socket.
    pub path: PathBuf,
}

/// The daemon's whole configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// INTERFACES.
    pub interfaces: Vec<String>,
    /// ALLOW_GID.
    pub allow_gid: Option<u32>,
    /// DEBUG_PORTS.
    pub debug_ports: Vec<StaticRule>,
    /// STATIC_PIPES.
    pub static_pipes: Vec<StaticRule>,
    /// STATIC_UDS.
    pub static_uds: Vec<StaticUds>,
    /// ADD_MACS.
    pub add_macs: Vec<[u8; 6]>,
    /// NO_HOST_RINGS.
    pub no_host_rings: bool,
    /// NO_ZERO_COPY.
    pub no_zero_copy: bool,
    /// NO_COALESCE.
    pub no_coalesce: bool,
    /// NO_IO_URING.
    pub no_io_uring: bool,
    /// NO_KERNEL_FAST_PATH.
    pub no_kernel_fast_path: bool,
    /// PCAP_LOG.
    pub pcap_log: Option<PathBuf>,
    /// RUST_LOG (the level filter string).
    pub rust_log: Option<String>,
    /// CORES: one worker per core.
    pub cores: Vec<usize>,
    /// KERNEL_CORE.
    pub kernel_core: usize,
    /// KERNEL_RPS_CORES.
    pub kernel_rps_cores: RpsCores,
    /// IDLE_SPIN_US.
    pub idle_spin: Duration,
    /// BATCH_WAIT_US.
    pub batch_wait: Duration,
    /// WORKER_SCHED.
    pub worker_sched: crate::sys::WorkerSched,
    /// BACKEND.
    pub backend: BackendKind,
    /// PACKET_RING.
    pub packet_ring: crate::backend::packet::PacketRing,
    /// CONTROL_SOCKET.
    pub control_socket: PathBuf,
    /// STATE_DIR.
    pub state_dir: PathBuf,
    /// AGE_INTERVAL.
    pub age_interval: Duration,
    /// MAX_RULES_PER_CLIENT.
    pub max_rules_per_client: usize,
    /// MAX_CHANNELS_PER_CLIENT.
    pub max_channels_per_client: usize,
}

/// Reads `KEY=VALUE` lines (blank lines and `#` comments ignored, optional `export `, optional
/// quotes around the value).
pub fn parse_config_file(text: &str, path: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(err(
                &path.display().to_string(),
                format!("line {}: expected KEY=VALUE, got '{line}'", no + 1),
            ));
        };
        let k = k.trim();
        let mut v = v.trim();
        if v.len() >= 2
            && ((v.starts_with('"') && v.ends_with('"'))
                || (v.starts_with('\'') && v.ends_with('\'')))
        {
            v = &v[1..v.len() - 1];
        }
        if !SETTINGS.iter().any(|(name, _)| *name == k) {
            return Err(err(
                &path.display().to_string(),
                format!("line {}: unknown setting '{k}'", no + 1),
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// Merges file settings with the environment (the environment wins) and parses them.
///
/// `env` is called for each known setting name; pass `|k| std::env::var(k).ok()`.
pub fn load(
    file: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut values = match file {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                err(
                    &p.display().to_string(),
                    format!("cannot read config file: {e}"),
                )
            })?;
            parse_config_file(&text, p)?
        }
        None => BTreeMap::new(),
    };
    for (name, _) in SETTINGS {
        if let Some(v) = env(name) {
            values.insert(name.to_string(), v);
        }
    }
    Config::from_values(&values)
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

fn parse_bool(name: &str, v: Option<&String>) -> Result<bool, ConfigError> {
    match v.map(|s| s.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(s) => match s.as_str() {
            "true" | "1" | "yes" => Ok(true),
            "" | "false" | "0" | "no" => Ok(false),
            _ => Err(err(name, format!("expected 'true' or 'false', got '{s}'"))),
        },
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, v: &str, what: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| err(name, format!("expected {what}, got '{}'", v.trim())))
}

/// Checks an interface name the way the kernel would (1-15 bytes, no '/', ':', whitespace).
pub fn check_ifname(setting: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 15 {
        return Err(err(
            setting,
            format!("interface name '{name}' must be 1 to 15 bytes long"),
        ));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        || name == "."
        || name == ".."
    {
        return Err(err(
            setting,
            format!("'{name}' is not a valid interface name"),
        ));
    }
    Ok(())
}

/// Parses one `<IF>:<TCP:PORT|UDP:PORT|ICMP|ICMPV6>[:<REMOTEIP>]` entry.
pub fn parse_static_rule(
    setting: &str,
    entry: &str,
    interfaces: &[String],
) -> Result<StaticRule, ConfigError> {
    let bad = |why: &str| err(setting, format!("entry '{entry}': {why}"));
    let mut parts = entry.splitn(3, ':');
    let iface = parts.next().unwrap_or("").trim();
    check_ifname(setting, iface)?;
    if !interfaces.iter().any(|i| i == iface) {
        return Err(bad(&format!("interface '{iface}' is not in INTERFACES")));
    }
    let kind = parts
        .next()
        .ok_or_else(|| bad("missing protocol (TCP:PORT, UDP:PORT or ICMP)"))?;
    let rest = parts.next();
    let (port, remote) = match kind.trim().to_ascii_uppercase().as_str() {
        p @ ("TCP" | "UDP") => {
            let rest = rest.ok_or_else(|| bad("missing port number"))?;
            let (num, remote) = match rest.split_once(':') {
                Some((n, r)) => (n, Some(r)),
                None => (rest, None),
            };
            let port: u16 = num
                .trim()
                .parse()
                .map_err(|_| bad(&format!("'{num}' is not a port number")))?;
            if port == 0 {
                return Err(bad("port 0 is not a valid port"));
            }
            let protocol = if p == "TCP" { proto::TCP } else { proto::UDP };
            (StaticPort { protocol, port }, remote)
        }
        "ICMP" => (
            StaticPort {
                protocol: proto::ICMP,
                port: 0,
            },
            rest,
        ),
        "ICMPV6" => (
            StaticPort {
                protocol: proto::ICMPV6,
                port: 0,
            },
            rest,
        ),
        other => {
            return Err(bad(&format!(
                "unknown protocol '{other}' (expected TCP, UDP, ICMP or ICMPV6)"
            )))
        }
    };
    let remote = match remote.map(str::trim) {
        None | Some("") => None,
        Some(r) => Some(
            r.parse::<IpAddr>()
                .map_err(|_| bad(&format!("'{r}' is not an IP address")))?,
        ),
    };
    Ok(StaticRule {
        interface: iface.to_string(),
        port,
        remote,
    })
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (or with '-').
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in s.trim().split([':', '-']) {
        if n == 6 || part.len() != 2 {
            return None;
        }
        mac[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(mac)
}

impl Config {
    /// Parses and checks merged settings.
    pub fn from_values(v: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let get = |k: &str| v.get(k).map(|s| s.trim()).filter(|s| !s.is_empty());

        let interfaces: Vec<String> = match get("INTERFACES") {
            None => {
                return Err(err(
                    "INTERFACES",
                    "is required (names of the NICs to claim, separated by commas)",
                ))
            }
            Some(s) => list(s).map(str::to_string).collect(),
        };
        if interfaces.is_empty() {
            return Err(err("INTERFACES", "names no interface"));
        }
        for (i, name) in interfaces.iter().enumerate() {
            check_ifname("INTERFACES", name)?;
            if interfaces[..i].contains(name) {
                return Err(err("INTERFACES", format!("'{name}' is listed twice")));
            }
            if name.len() + "usnetd".len() > 15 {
                return Err(err(
                    "INTERFACES",
                    format!(
                        "'{name}' is too long: the kernel's TAP '{name}usnetd' must fit 15 bytes"
                    ),
                ));
            }
        }

        let allow_gid = get("ALLOW_GID")
            .map(|s| parse_num("ALLOW_GID", s, "a numeric group id"))
            .transpose()?;
        let debug_ports = get("DEBUG_PORTS")
            .map(|s| {
                list(s)
                    .map(|e| parse_static_rule("DEBUG_PORTS", e, &interfaces))
                    .collect()
            })
            .transpose()?
            .unwrap_or_default();
        let static_pipes: Vec<StaticRule> = get("STATIC_PIPES")
            .map(|s| {
                list(s)
                    .map(|e| parse_static_rule("STATIC_PIPES", e, &interfaces))
                    .collect()
            })
            .transpose()?
            .unwrap_or_default();
        let static_uds = get("STATIC_UDS")
            .map(|s| {
                list(s)
                    .map(|e| {
                        let (rule, path) = e.rsplit_once('@').ok_or_else(|| {
                            err(
                                "STATIC_UDS",
                                format!("entry '{e}': expected <IF>:<RULE>@<SOCKET PATH>"),
                            )
                        })?;
                        let path = PathBuf::from(path.trim());
                        if !path.is_absolute() {
                            return Err(err(
                                "STATIC_UDS",
                                format!("entry '{e}': the socket path must be absolute"),
                            ));
                        }
                        Ok(StaticUds {
                            rule: parse_static_rule("STATIC_UDS", rule, &interfaces)?,
                            path,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let add_macs = get("ADD_MACS")
            .map(|s| {
                list(s)
                    .map(|m| {
                        parse_mac(m)
                            .ok_or_else(|| err("ADD_MACS", format!("'{m}' is not a MAC address")))
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        let no_host_rings = parse_bool("NO_HOST_RINGS", v.get("NO_HOST_RINGS"))?;
        let no_zero_copy = parse_bool("NO_ZERO_COPY", v.get("NO_ZERO_COPY"))?;
        let no_coalesce = parse_bool("NO_COALESCE", v.get("NO_COALESCE"))?;
        let no_io_uring = parse_bool("NO_IO_URING", v.get("NO_IO_URING"))?;
        let no_kernel_fast_path = parse_bool("NO_KERNEL_FAST_PATH", v.get("NO_KERNEL_FAST_PATH"))?;
        let pcap_log = get("PCAP_LOG").map(PathBuf::from);
        let rust_log = get("RUST_LOG").map(str::to_string);

        let cores = match get("CORES") {
            None => vec![0],
            Some(s) => {
                usnetd_shards::cores::parse_core_list(s).map_err(|e| err("CORES", e.to_string()))?
            }
        };
        let online = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let max_core = core_count_limit(online);
        if let Some(&c) = cores.iter().find(|&&c| c >= max_core) {
            return Err(err(
                "CORES",
                format!(
                    "core {c} does not exist (this machine has cores 0-{})",
                    max_core - 1
                ),
            ));
        }
        let kernel_core = match get("KERNEL_CORE") {
            None => cores[0],
            Some(s) => {
                let c: usize = parse_num("KERNEL_CORE", s, "a core number")?;
                if c >= max_core {
                    return Err(err("KERNEL_CORE", format!("core {c} does not exist")));
                }
                c
            }
        };
        let kernel_rps_cores = match get("KERNEL_RPS_CORES").map(str::trim) {
            None | Some("") | Some("auto") => RpsCores::Auto,
            Some("off") => RpsCores::Off,
            Some(s) => {
                let list = usnetd_shards::cores::parse_core_list(s)
                    .map_err(|e| err("KERNEL_RPS_CORES", format!("{e} (or 'off', 'auto')")))?;
                if let Some(&c) = list.iter().find(|&&c| c >= max_core) {
                    return Err(err("KERNEL_RPS_CORES", format!("core {c} does not exist")));
                }
                RpsCores::Cores(list)
            }
        };
        let idle_spin_us: u64 = get("IDLE_SPIN_US")
            .map(|s| parse_num("IDLE_SPIN_US", s, "microseconds"))
            .transpose()?
            .unwrap_or(usnetd_shards::worker::DEFAULT_IDLE_SPIN.as_micros() as u64);
        if idle_spin_us > 1_000_000 {
            return Err(err("IDLE_SPIN_US", "must be at most 1000000 (one second)"));
        }
        let batch_wait_us: u64 = get("BATCH_WAIT_US")
            .map(|s| parse_num("BATCH_WAIT_US", s, "microseconds"))
            .transpose()?
            .unwrap_or(0);
        if batch_wait_us > 10_000 {
            return Err(err("BATCH_WAIT_US", "must be at most 10000 (10 ms)"));
        }
        let worker_sched = crate::sys::WorkerSched::parse(get("WORKER_SCHED").unwrap_or(""))
            .map_err(|e| err("WORKER_SCHED", e))?;
        let backend = BackendKind::parse(get("BACKEND").unwrap_or("auto"))?;
        let packet_ring = match get("PACKET_RING").map(str::trim).unwrap_or("frames") {
            "frames" => crate::backend::packet::PacketRing::Frames,
            "blocks" => crate::backend::packet::PacketRing::Blocks,
            other => {
                return Err(err(
                    "PACKET_RING",
                    format!("expected frames or blocks, got '{other}'"),
                ))
            }
        };
        if backend == BackendKind::Netmap && !cfg!(feature = "netmap") {
            return Err(err(
                "BACKEND",
                "netmap support is not built in (build with --features netmap)",
            ));
        }
        if !static_pipes.is_empty() && !cfg!(feature = "netmap") {
            return Err(err(
                "STATIC_PIPES",
                "netmap pipes need a build with --features netmap",
            ));
        }
        let control_socket = PathBuf::from(get("CONTROL_SOCKET").unwrap_or("/run/usnetd.socket"));
        if !control_socket.is_absolute() {
            return Err(err("CONTROL_SOCKET", "must be an absolute path"));
        }
        let state_dir = PathBuf::from(get("STATE_DIR").unwrap_or("/run/usnetd"));
        if !state_dir.is_absolute() {
            return Err(err("STATE_DIR", "must be an absolute path"));
        }
        let age_secs: u64 = get("AGE_INTERVAL")
            .map(|s| parse_num("AGE_INTERVAL", s, "seconds"))
            .transpose()?
            .unwrap_or(90);
        if age_secs == 0 {
            return Err(err("AGE_INTERVAL", "must be at least 1 second"));
        }
        let max_rules_per_client = get("MAX_RULES_PER_CLIENT")
            .map(|s| parse_num("MAX_RULES_PER_CLIENT", s, "a number"))
            .transpose()?
            .unwrap_or(4096);
        let max_channels_per_client = get("MAX_CHANNELS_PER_CLIENT")
            .map(|s| parse_num("MAX_CHANNELS_PER_CLIENT", s, "a number"))
            .transpose()?
            .unwrap_or(8);
        Ok(Config {
            interfaces,
            allow_gid,
            debug_ports,
            static_pipes,
            static_uds,
            add_macs,
            no_host_rings,
            no_zero_copy,
            no_coalesce,
            no_io_uring,
            no_kernel_fast_path,
            pcap_log,
            rust_log,
            cores,
            kernel_core,
            kernel_rps_cores,
            idle_spin: Duration::from_micros(idle_spin_us),
            batch_wait: Duration::from_micros(batch_wait_us),
            worker_sched,
            backend,
            packet_ring,
            control_socket,
            state_dir,
            age_interval: Duration::from_secs(age_secs),
            max_rules_per_client,
            max_channels_per_client,
        })
    }
}

/// The number of cores that may be named: those the kernel reports as possible, at least the
/// online ones.
fn core_count_limit(online: usize) -> usize {
    std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| usnetd_shards::cores::parse_core_list(s.trim()).ok())
        .and_then(|v| v.last().map(|c| c + 1))
        .unwrap_or(online)
        .max(online)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let v = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_values(&v)
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = cfg(&[("INTERFACES", "eth0")]).unwrap();
        assert_eq!(c.interfaces, vec!["eth0"]);
        assert_eq!(c.cores, vec![0]);
        assert_eq!(c.kernel_core, 0);
        assert_eq!(c.kernel_rps_cores, RpsCores::Auto);
        assert_eq!(c.backend, BackendKind::Auto);
        assert_eq!(c.control_socket, PathBuf::from("/run/usnetd.socket"));
        assert_eq!(c.age_interval, Duration::from_secs(90));
        assert!(!c.no_host_rings);
    }

    #[test]
    fn kernel_rps_cores_parse() {
        let rps = |v: &str| cfg(&[("INTERFACES", "eth0"), ("KERNEL_RPS_CORES", v)]);
        assert_eq!(rps("auto").unwrap().kernel_rps_cores, RpsCores::Auto);
        assert_eq!(rps("off").unwrap().kernel_rps_cores, RpsCores::Off);
        assert_eq!(rps("0").unwrap().kernel_rps_cores, RpsCores::Cores(vec![0]));
        assert_eq!(rps("x").unwrap_err().setting, "KERNEL_RPS_CORES");
        assert_eq!(rps("100000").unwrap_err().setting, "KERNEL_RPS_CORES");
    }

    #[test]
    fn interfaces_required_and_checked() {
        assert_eq!(cfg(&[]).unwrap_err().setting, "INTERFACES");
        assert_eq!(
            cfg(&[("INTERFACES", " , ")]).unwrap_err().setting,
            "INTERFACES"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0,eth0")]).unwrap_err().setting,
            "INTERFACES"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "a/b")]).unwrap_err().setting,
            "INTERFACES"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "averylongname12")])
                .unwrap_err()
                .setting,
            "INTERFACES"
        );
    }

    #[test]
    fn debug_ports_like_the_original() {
        let c = cfg(&[
            ("INTERFACES", "eth0"),
            (
                "DEBUG_PORTS",
                "eth0:TCP:22, eth0:UDP:53:10.0.0.1,eth0:ICMP,eth0:tcp:80:fd00::1",
            ),
        ])
        .unwrap();
        assert_eq!(c.debug_ports.len(), 4);
        assert_eq!(
            c.debug_ports[0].port,
            StaticPort {
                protocol: 6,
                port: 22
            }
        );
        assert_eq!(c.debug_ports[1].remote, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(
            c.debug_ports[2].port,
            StaticPort {
                protocol: 1,
                port: 0
            }
        );
        assert_eq!(c.debug_ports[3].remote, Some("fd00::1".parse().unwrap()));
        for bad in [
            "eth1:TCP:22",
            "eth0:TCP",
            "eth0:TCP:99999",
            "eth0:XYZ:1",
            "eth0:UDP:53:notanip",
            "eth0:TCP:0",
        ] {
            let e = cfg(&[("INTERFACES", "eth0"), ("DEBUG_PORTS", bad)]).unwrap_err();
            assert_eq!(e.setting, "DEBUG_PORTS", "{bad}");
            assert!(
                e.to_string().contains(bad.split(':').next().unwrap()),
                "{e}"
            );
        }
    }

    #[test]
    fn static_uds_and_macs() {
        let c = cfg(&[
            ("INTERFACES", "eth0"),
            ("STATIC_UDS", "eth0:UDP:5000@/run/a.sock"),
            ("ADD_MACS", "02:00:00:00:00:01,02-00-00-00-00-02"),
        ])
        .unwrap();
        assert_eq!(c.static_uds[0].path, PathBuf::from("/run/a.sock"));
        assert_eq!(c.add_macs[1], [2, 0, 0, 0, 0, 2]);
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("STATIC_UDS", "eth0:UDP:5000")])
                .unwrap_err()
                .setting,
            "STATIC_UDS"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("ADD_MACS", "02:00:00")])
                .unwrap_err()
                .setting,
            "ADD_MACS"
        );
    }

    #[test]
    fn idle_spin_and_packet_ring() {
        let c = cfg(&[("INTERFACES", "eth0")]).unwrap();
        assert_eq!(c.idle_spin, usnetd_shards::worker::DEFAULT_IDLE_SPIN);
        assert_eq!(c.packet_ring, crate::backend::packet::PacketRing::Frames);
        assert_eq!(c.worker_sched, crate::sys::WorkerSched::Normal);
        assert_eq!(c.batch_wait, Duration::ZERO);
        let c = cfg(&[
            ("INTERFACES", "eth0"),
            ("IDLE_SPIN_US", "0"),
            ("PACKET_RING", "blocks"),
            ("WORKER_SCHED", "fifo:20"),
            ("BATCH_WAIT_US", "40"),
        ])
        .unwrap();
        assert_eq!(c.batch_wait, Duration::from_micros(40));
        assert_eq!(c.worker_sched, crate::sys::WorkerSched::Fifo(20));
        assert_eq!(c.idle_spin, Duration::ZERO);
        assert_eq!(c.packet_ring, crate::backend::packet::PacketRing::Blocks);
        for (k, v) in [
            ("IDLE_SPIN_US", "-1"),
            ("IDLE_SPIN_US", "2000000"),
            ("PACKET_RING", "v4"),
            ("WORKER_SCHED", "fifo:0"),
            ("WORKER_SCHED", "realtime"),
            ("BATCH_WAIT_US", "20000"),
            ("BATCH_WAIT_US", "soon"),
        ] {
            assert_eq!(
                cfg(&[("INTERFACES", "eth0"), (k, v)]).unwrap_err().setting,
                k
            );
        }
    }

    #[test]
    fn bools_backend_cores() {
        assert!(
            cfg(&[("INTERFACES", "eth0"), ("NO_HOST_RINGS", "true")])
                .unwrap()
                .no_host_rings
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("NO_HOST_RINGS", "maybe")])
                .unwrap_err()
                .setting,
            "NO_HOST_RINGS"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("BACKEND", "dpdk")])
                .unwrap_err()
                .setting,
            "BACKEND"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("BACKEND", "packet")])
                .unwrap()
                .backend,
            BackendKind::Packet
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("CORES", "5-2")])
                .unwrap_err()
                .setting,
            "CORES"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("CORES", "100000")])
                .unwrap_err()
                .setting,
            "CORES"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("AGE_INTERVAL", "0")])
                .unwrap_err()
                .setting,
            "AGE_INTERVAL"
        );
        assert_eq!(
            cfg(&[("INTERFACES", "eth0"), ("CONTROL_SOCKET", "rel")])
                .unwrap_err()
                .setting,
            "CONTROL_SOCKET"
        );
    }

    #[test]
    fn file_then_environment() {
        let p = Path::new("/x.conf");
        let m = parse_config_file(
            "# c\nRUST_LOG=debug\nexport INTERFACES=\"eth0\"\n\nDEBUG_PORTS=eth0:TCP:22\n",
            p,
        )
        .unwrap();
        assert_eq!(m["INTERFACES"], "eth0");
        assert!(parse_config_file("BOGUS=1\n", p)
            .unwrap_err()
            .problem
            .contains("unknown setting"));
        assert!(parse_config_file("novalue\n", p)
            .unwrap_err()
            .problem
            .contains("line 1"));
        let dir = std::env::temp_dir().join(format!("usnetd-cfg-{}", std::process::id()));
        std::fs::write(&dir, "INTERFACES=eth0\nCORES=0\n").unwrap();
        let c = load(Some(&dir), |k| {
            (k == "INTERFACES").then(|| "eth1".to_string())
        })
        .unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert_eq!(c.interfaces, vec!["eth1"]);
        assert!(load(Some(Path::new("/nonexistent/usnetd.conf")), |_| None).is_err());
    }
}
