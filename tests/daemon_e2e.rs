//! End-to-end tests of the daemon on the virtual testbed (root only): for each backend, with one
//! and with two workers, the kernel behind the switch is firewalled exactly as SEMANTICS.md
//! says, ARP and DHCP pass, and the host is put back as it was on SIGTERM and repaired after
//! SIGKILL.
//!
//! Every wait is bounded. "Not reachable" is judged by a connection attempt that gets no answer
//! within a few seconds while the same attempt on an open port succeeds.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/shell.rs"]
mod shell;
use shell::{have, is_root};

const SW_IP: &str = "10.77.0.2";
const PEER_IP: &str = "10.77.0.1";
const SW_IP6: &str = "fd77::2";

#[path = "common/testbed.rs"]
mod testbed;
use testbed::{Background, Daemon, Testbed};

/// The switch host's addresses, routes and links, without counters and timers.
fn host_state(tb: &Testbed) -> String {
    let out = tb.sw(
        "ip -o addr show; ip -4 route show table all; ip -6 route show table all; ip -o link show",
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("valid_lft") || !l.contains("dynamic"))
        .map(|l| {
            // drop lifetimes, which count down
            let mut s = l.to_string();
            if let Some(i) = s.find("valid_lft") {
                s.truncate(i);
            }
            s
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Connects with TCP, sends a line, expects it echoed. Bounded by `secs`.
fn tcp_echo(tb: &Testbed, from_peer: bool, ip: &str, port: u16, secs: u32) -> bool {
    let py = format!(
        "import socket,sys\ns=socket.create_connection((\"{ip}\",{port}),timeout={secs})\ns.settimeout({secs})\ns.sendall(b\"hello usnetd\\n\")\nd=b\"\"\nwhile not d.endswith(b\"\\n\"):\n  c=s.recv(100)\n  if not c: break\n  d+=c\nsys.exit(0 if d==b\"hello usnetd\\n\" else 1)\n"
    );
    let cmd = format!(
        "timeout {} python3 -c '{}'",
        secs + 2,
        py.replace('\'', "'\\''")
    );
    let out = if from_peer {
        tb.peer(&cmd)
    } else {
        tb.sw(&cmd)
    };
    out.status.success()
}

/// From the peer: sends `bytes` of deterministic pseudo-random data to an echo server while
/// reading the echo, and compares the two. Bounded (60 s).
fn tcp_bulk_echo(tb: &Testbed, ip: &str, port: u16, bytes: usize) -> bool {
    let py = format!(
        "import hashlib,random,socket,sys,threading\ndata=random.Random(7).randbytes({bytes})\ns=socket.create_connection((\"{ip}\",{port}),timeout=30)\ns.settimeout(30)\nt=threading.Thread(target=lambda: s.sendall(data))\nt.start()\ngot=bytearray()\nwhile len(got)<len(data):\n  c=s.recv(1<<16)\n  if not c: break\n  got+=c\nt.join()\nsys.exit(0 if hashlib.sha256(got).digest()==hashlib.sha256(data).digest() else 1)\n"
    );
    tb.peer(&format!(
        "timeout 60 python3 -c '{}'",
        py.replace('\'', "'\\''")
    ))
    .status
    .success()
}

fn udp_echo(tb: &Testbed, ip: &str, port: u16) -> bool {
    let py = format!(
        "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(3)\ns.sendto(b\"ping\",(\"{ip}\",{port}))\nd,_=s.recvfrom(100)\nsys.exit(0 if d==b\"ping\" else 1)\n"
    );
    tb.sw(&format!(
        "timeout 5 python3 -c '{}'",
        py.replace('\'', "'\\''")
    ))
    .status
    .success()
}

/// A TCP echo server on `port` of both IPv4 and IPv6.
fn echo_server_tcp(tb: &Testbed, side: &str, port: u16) -> Background {
    tb.spawn(
        side,
        &format!("socat TCP6-LISTEN:{port},ipv6only=0,reuseaddr,fork EXEC:cat"),
    )
}

fn wait_listen(tb: &Testbed, side: &str, port: u16, udp: bool) {
    let flag = if udp { "-uln" } else { "-tln" };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = if side == "sw" {
            tb.sw(&format!("ss {flag}"))
        } else {
            tb.peer(&format!("ss {flag}"))
        };
        if String::from_utf8_lossy(&out.stdout).contains(&format!(":{port} ")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "server on port {port} did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The kernel fast path's counters in stats.json (`None`: no such entry), once the daemon has
/// written them with at least `min_frames` frames passed by listening rules and by connection
/// rules each, out and (`inbound`) in (bounded wait: stats.json is rewritten every second).
fn fast_path_stats(tb: &Testbed, min_frames: u64, inbound: bool) -> Option<serde_json::Value> {
    let path = tb.dir.join("state/stats.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let entry = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v.get("sw0")
                    .and_then(|n| n.get("kernel_fast_path"))
                    .cloned()
            });
        let count = |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        match &entry {
            Some(e)
                if [
                    "frames_by_listening_rules",
                    "frames_by_connection_rules",
                    "frames_out_by_listening_rules",
                    "frames_out_by_connection_rules",
                ]
                .iter()
                .skip(if inbound { 0 } else { 2 })
                .all(|k| count(e, k) >= min_frames) =>
            {
                return entry
            }
            _ if Instant::now() >= deadline => return entry,
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn scenario(backend: &str, cores: &str) {
    scenario_with(backend, cores, &[]);
}

fn scenario_with(backend: &str, cores: &str, settings: &[(&str, &str)]) {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    for tool in ["socat", "python3", "dnsmasq", "dhclient", "ss"] {
        if !have(tool) {
            panic!("{tool} is missing: install it (see .ci/run)");
        }
    }
    let tb = Testbed::up(&format!("ue{}", &backend[..1]), "off");
    let before = host_state(&tb);

    let _kernel_debug = echo_server_tcp(&tb, "sw", 2222);
    let _kernel_closed = echo_server_tcp(&tb, "sw", 2223);
    let _peer_tcp = echo_server_tcp(&tb, "peer", 3333);
    let _peer_udp = tb.spawn("peer", "socat UDP-LISTEN:3334,reuseaddr,fork EXEC:cat");
    wait_listen(&tb, "sw", 2222, false);
    wait_listen(&tb, "sw", 2223, false);
    wait_listen(&tb, "peer", 3333, false);
    wait_listen(&tb, "peer", 3334, true);
    // Direct (no switch) sanity: both kernel ports answer.
    assert!(
        tcp_echo(&tb, true, SW_IP, 2223, 3),
        "testbed broken: direct TCP does not work"
    );

    let mut env = vec![
        ("BACKEND", backend),
        ("CORES", cores),
        ("DEBUG_PORTS", "sw0:TCP:2222"),
    ];
    env.extend_from_slice(settings);
    // The kernel's fast path: its egress half with every backend, its receive half with xdp.
    let fast_path = !settings.contains(&("NO_KERNEL_FAST_PATH", "true"));
    let fast_path_in = fast_path && backend == "xdp";
    let mut d = Daemon::start(&tb, &env);
    let log = d.log.text();
    assert!(
        log.contains(backend),
        "start-up log does not name the backend: {log}"
    );
    assert_rps_default(&tb, cores);

    // The firewall: DEBUG_PORTS open, every other port closed.
    tb.peer("ip neigh flush all");
    assert!(
        tcp_echo(&tb, true, SW_IP, 2222, 5),
        "kernel DEBUG_PORTS server not reachable through the switch"
    );
    // ARP from the peer resolved the kernel's IP to the NIC's MAC.
    let sw_mac = String::from_utf8_lossy(&tb.sw("cat /sys/class/net/sw0/address").stdout)
        .trim()
        .to_string();
    let neigh =
        String::from_utf8_lossy(&tb.peer(&format!("ip neigh show {SW_IP}")).stdout).to_string();
    assert!(
        neigh.contains(&sw_mac),
        "peer's ARP entry for {SW_IP} is not sw0's MAC {sw_mac}: {neigh}"
    );
    assert!(
        !tcp_echo(&tb, true, SW_IP, 2223, 2),
        "kernel port outside DEBUG_PORTS is reachable"
    );
    // The same over IPv6 (neighbour discovery copied to the kernel like ARP).
    assert!(
        tcp_echo(&tb, true, SW_IP6, 2222, 5),
        "kernel DEBUG_PORTS server not reachable over IPv6 through the switch"
    );
    assert!(
        !tcp_echo(&tb, true, SW_IP6, 2223, 2),
        "kernel port outside DEBUG_PORTS is reachable over IPv6"
    );
    // Bulk data arrives intact both ways (the TAP coalesces the peer's segments into
    // super-packets, the kernel's come back out of the TAP).
    assert!(
        tcp_bulk_echo(&tb, SW_IP, 2222, 8 << 20),
        "8 MiB echoed through the switch came back different"
    );

    // The kernel's own flows are learned: TCP, UDP, ICMP out; unsolicited ping in is dropped.
    tb.sw("ip neigh flush all");
    assert!(
        tcp_echo(&tb, false, PEER_IP, 3333, 5),
        "kernel outgoing TCP through the switch failed"
    );
    assert!(
        udp_echo(&tb, PEER_IP, 3334),
        "kernel outgoing UDP through the switch failed"
    );
    // (The unsolicited ping comes first: the kernel's own ping teaches a portless ICMP rule that
    // lets the peer's echo requests in until it ages out, as in the original.)
    assert!(
        !tb.peer(&format!("ping -c 2 -W 1 {SW_IP}")).status.success(),
        "unsolicited ping was answered"
    );
    assert!(
        tb.sw(&format!("ping -c 2 -W 2 {PEER_IP}")).status.success(),
        "kernel ping to the peer failed"
    );
    // With XDP, the frames of the kernel's rules went straight to its stack: the DEBUG_PORTS
    // connections' by the listening rule, the replies to its own connection by a learned rule.
    let stats = fast_path_stats(&tb, u64::from(fast_path), fast_path_in);
    if fast_path {
        let stats = stats.expect("stats.json has no kernel_fast_path entry");
        let n = |k: &str| stats[k].as_u64().unwrap_or(0);
        if fast_path_in {
            assert!(n("frames_by_listening_rules") > 0, "{stats}");
            assert!(n("frames_by_connection_rules") > 0, "{stats}");
        } else {
            assert_eq!(n("frames_by_listening_rules"), 0, "{stats}");
            assert_eq!(n("frames_by_connection_rules"), 0, "{stats}");
        }
        assert!(n("rules") >= 1 && n("refused") == 0, "{stats}");
        // The kernel's own frames of those flows left from the TAP's egress: the replies from
        // the DEBUG_PORTS servers, and its own connection after the first segment.
        assert_eq!(stats["egress"], "on", "{stats}");
        assert!(n("frames_out_by_listening_rules") > 0, "{stats}");
        assert!(n("frames_out_by_connection_rules") > 0, "{stats}");
        assert!(n("local_macs") >= 1, "the kernel's MAC: {stats}");
    } else {
        assert!(stats.is_none(), "a kernel fast path turned off: {stats:?}");
    }

    // DHCP through the switch: dnsmasq in the peer namespace, dhclient on the switch's host.
    let lease_dir = std::env::temp_dir().join(format!("{}-dhcp", tb.prefix));
    std::fs::create_dir_all(&lease_dir).unwrap();
    let _dnsmasq = tb.spawn(
        "peer",
        &format!(
            "dnsmasq --no-daemon --port=0 --interface=peer0 --bind-interfaces --dhcp-range=10.77.0.100,10.77.0.150,12h --dhcp-leasefile={}/dnsmasq.leases --pid-file={}/dnsmasq.pid",
            lease_dir.display(),
            lease_dir.display()
        ),
    );
    let dh = tb.sw(&format!(
        "timeout 20 dhclient -1 -v -sf /bin/true -lf {0}/dhclient.leases -pf {0}/dhclient.pid sw0usnetd",
        lease_dir.display()
    ));
    let leases = std::fs::read_to_string(lease_dir.join("dhclient.leases")).unwrap_or_default();
    let _ = tb.sw(&format!(
        "kill $(cat {}/dhclient.pid) 2>/dev/null",
        lease_dir.display()
    ));
    assert!(
        leases.contains("fixed-address 10.77.0.1"),
        "no DHCP lease through the switch: {}\n{}",
        String::from_utf8_lossy(&dh.stderr),
        leases
    );

    // SIGTERM puts the host back exactly as it was.
    let st = d.signal("TERM");
    assert!(st.success(), "usnetd exited with {st} after SIGTERM");
    assert_eq!(host_state(&tb), before, "host state differs after SIGTERM");
    assert!(
        tcp_echo(&tb, true, SW_IP, 2223, 5),
        "kernel not reachable directly after the switch stopped"
    );

    // SIGKILL leaves the takeover behind; the next start repairs it.
    let mut d = Daemon::start(&tb, &[("BACKEND", backend), ("CORES", cores)]);
    d.signal("KILL");
    assert_ne!(
        host_state(&tb),
        before,
        "SIGKILL left nothing to repair (test cannot tell)"
    );
    let mut d = Daemon::start(&tb, &[("BACKEND", backend), ("CORES", cores)]);
    assert!(
        d.log.text().contains("repair"),
        "restart did not report a repair"
    );
    assert!(d.signal("TERM").success());
    assert_eq!(
        host_state(&tb),
        before,
        "host state differs after SIGKILL, restart and SIGTERM"
    );
    let _ = std::fs::remove_dir_all(&lease_dir);
}

/// The TAP's RPS cores (KERNEL_RPS_CORES unset): the online cores outside CORES (and the
/// kernel-side core, the first of CORES), or none when there is no such core.
fn assert_rps_default(tb: &Testbed, cores: &str) {
    let workers = usnetd_shards::cores::parse_core_list(cores).unwrap();
    let Some(online) = usnetd::host::rps::online_cores() else {
        eprintln!("RPS check skipped: no /sys/devices/system/cpu/online");
        return;
    };
    let spare: Vec<usize> = online
        .iter()
        .copied()
        .filter(|c| !workers.contains(c))
        .collect();
    let out = tb.sw("cat /sys/class/net/sw0usnetd/queues/rx-*/rps_cpus");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let masks: Vec<&str> = text.split_whitespace().collect();
    assert!(!masks.is_empty(), "no rps_cpus on the TAP: {out:?}");
    for mask in masks {
        let mut set = Vec::new();
        for (i, digit) in mask.replace(',', "").chars().rev().enumerate() {
            let bits = digit.to_digit(16).expect("a hex digit");
            set.extend((0..4).filter(|b| bits & (1 << b) != 0).map(|b| 4 * i + b));
        }
        assert_eq!(set, spare, "rps_cpus {mask} with CORES={cores}");
    }
}

#[test]
fn xdp_one_worker() {
    scenario("xdp", "0");
}

#[test]
fn xdp_two_workers() {
    scenario("xdp", "0-1");
}

#[test]
fn xdp_two_workers_without_kernel_fast_path() {
    scenario_with("xdp", "0-1", &[("NO_KERNEL_FAST_PATH", "true")]);
}

#[test]
fn packet_one_worker() {
    scenario("packet", "0");
}

#[test]
fn packet_two_workers() {
    scenario("packet", "0-1");
}

#[test]
fn macvtap_one_worker() {
    scenario("macvtap", "0");
}

#[test]
fn macvtap_two_workers() {
    scenario("macvtap", "0-1");
}

#[test]
fn a_second_daemon_on_the_same_nic_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let tb = Testbed::up("ued", "off");
    let mut first = Daemon::start(&tb, &[("BACKEND", "packet")]);
    let during = host_state(&tb);
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-sw", tb.prefix),
            env!("CARGO_BIN_EXE_usnetd"),
        ])
        .env_clear()
        .env("INTERFACES", "sw0")
        .env("BACKEND", "packet")
        .env(
            "STATE_DIR",
            std::env::temp_dir().join(format!("{}-state2", tb.prefix)),
        )
        .env(
            "CONTROL_SOCKET",
            std::env::temp_dir().join(format!("{}-ctl2", tb.prefix)),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second usnetd claimed sw0: {err}");
    assert!(
        err.contains("INTERFACES") && err.contains("already claimed"),
        "{err}"
    );
    assert_eq!(
        host_state(&tb),
        during,
        "the refused start changed the system"
    );
    assert!(first.signal("TERM").success());
}

#[test]
fn routes_recreated_by_a_link_flap_go_back_to_the_tap() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let tb = Testbed::up("uef", "off");
    // Without this the kernel itself drops sw0's static IPv6 address on link down (nothing
    // usnetd does or undoes); keep it so that the whole state can be compared.
    tb.sw("sysctl -qw net.ipv6.conf.sw0.keep_addr_on_down=1");
    let before = host_state(&tb);
    let mut d = Daemon::start(&tb, &[("BACKEND", "packet")]);
    // A link flap makes the kernel recreate the prefix routes on the NIC.
    tb.sw("ip link set sw0 down; ip link set sw0 up");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let on_nic = String::from_utf8_lossy(&tb.sw("ip -4 route show dev sw0").stdout).to_string();
        if on_nic.trim().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "routes stayed on the NIC after a link flap: {on_nic}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let on_tap =
        String::from_utf8_lossy(&tb.sw("ip -4 route show dev sw0usnetd").stdout).to_string();
    assert!(
        on_tap.contains("10.77.0.0/24"),
        "prefix route not on the TAP: {on_tap}"
    );
    assert!(d.signal("TERM").success());
    assert_eq!(
        host_state(&tb),
        before,
        "host state differs after a flap and SIGTERM"
    );
}

#[test]
fn bad_config_fails_before_touching_the_system() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let tb = Testbed::up("uec", "off");
    let before = host_state(&tb);
    for (k, v) in [
        ("CORES", "5-2"),
        ("BACKEND", "dpdk"),
        ("DEBUG_PORTS", "sw0:TCP:notaport"),
        ("INTERFACES", "nosuchif0"),
    ] {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &format!("{}-sw", tb.prefix),
                env!("CARGO_BIN_EXE_usnetd"),
            ])
            .env_clear()
            .env("INTERFACES", "sw0")
            .env(
                "STATE_DIR",
                std::env::temp_dir().join(format!("{}-state", tb.prefix)),
            )
            .env(
                "CONTROL_SOCKET",
                std::env::temp_dir().join(format!("{}-ctl", tb.prefix)),
            )
            .env(k, v)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let st = child.wait().unwrap();
        assert!(!st.success(), "{k}={v} was accepted");
        assert!(
            err.contains(k),
            "message for {k}={v} does not name the setting: {err}"
        );
        assert_eq!(host_state(&tb), before, "{k}={v} changed the system");
    }
}
