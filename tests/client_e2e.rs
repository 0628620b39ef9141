//! End-to-end tests of clients behind the daemon on the virtual testbed (root only), with two
//! workers, for the `packet` and the `xdp` backend:
//!
//! - on the kernel's own IP, the smoltcp example service answers HTTP on its port, the kernel
//!   answers on its DEBUG_PORTS port, and every other port gets nothing;
//! - the service's outgoing TCP connection (`--connect`) works, over both channel kinds;
//! - a second service on its own IP with `--channel shm` answers HTTP and pings;
//! - one of two clients is SIGKILLed: its rules disappear (the time it took is printed) and the
//!   other keeps working;
//! - a client that never reads its channel (UDS or shared memory) is flooded: the other client
//!   still receives every one of its frames, and the excess is counted as `channel_full`;
//! - a STATIC_UDS client receives its UDP datagrams as Ethernet frames.
//!
//! Every wait is bounded. "Gets nothing" is judged by a connection attempt that gets no answer
//! within a few seconds while the same attempt on an open port succeeds.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use usnetd_client::channel::{PacketChannel, UdsChannel};
use usnetd_client::protocol::{UsnetMatch, WireIp};
use usnetd_client::shm::ShmClient;
use usnetd_client::Client;

#[path = "common/shell.rs"]
mod shell;
use shell::{have, is_root, root_dir, run};

const SW_IP: &str = "10.77.0.2";
const PEER_IP: &str = "10.77.0.1";
/// The body the example service answers `GET /` with.
const HTTP_BODY: &str = "hello from smoltcp behind usnetd\n";

#[path = "common/testbed.rs"]
mod testbed;
use testbed::{quote, Daemon, Lines};

/// The shared testbed, with where this test's daemon keeps its sockets and state.
struct Testbed(testbed::Testbed);

impl std::ops::Deref for Testbed {
    type Target = testbed::Testbed;
    fn deref(&self) -> &testbed::Testbed {
        &self.0
    }
}

impl Testbed {
    fn up(tag: &str) -> Testbed {
        Testbed::up_with(tag, "off")
    }
    /// A testbed with the veth's checksum/segmentation offloads `on` or `off`.
    fn up_with(tag: &str, offloads: &str) -> Testbed {
        Testbed(testbed::Testbed::up(&format!("uc{tag}"), offloads))
    }
    fn control_socket(&self) -> PathBuf {
        self.dir.join("ctl.sock")
    }
    fn stats_path(&self) -> PathBuf {
        self.dir.join("state/stats.json")
    }
}

/// The example service binary, built on demand (`cargo test` builds examples with
/// `test = true` only as test harnesses).
fn service_binary() -> PathBuf {
    static BUILT: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = built.as_ref() {
        return p.clone();
    }
    // target/<profile>/deps/client_e2e-HASH -> target/<profile>/examples/smoltcp_service
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("examples/smoltcp_service");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let out = run(&format!(
        "cd {} && timeout 900 {cargo} build {} -p usnetd-client --example smoltcp_service 2>&1",
        root_dir().display(),
        if release { "--release" } else { "" }
    ));
    assert!(
        out.status.success() && bin.exists(),
        "building the smoltcp_service example failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    *built = Some(bin.clone());
    bin
}

/// A running smoltcp example service (in the switch's namespace), SIGKILLed on drop.
struct Service {
    child: Child,
    out: Lines,
}

impl Service {
    fn start(tb: &Testbed, name: &str, args: &[&str]) -> Service {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &format!("{}-sw", tb.prefix)])
            .arg(service_binary())
            .args(args)
            .env("XDG_RUNTIME_DIR", &tb.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start smoltcp_service");
        let out = Lines::follow(child.stdout.take().unwrap(), name.into());
        let mut s = Service { child, out };
        if !s.out.wait_for("ready", Duration::from_secs(20)) {
            let _ = s.child.kill();
            panic!("{name} did not become ready; output:\n{}", s.out.text());
        }
        s
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// From the peer: `GET /` on ip:port; the body of a 200 answer, `None` on anything else.
fn http_get(tb: &Testbed, ip: &str, port: u16, secs: u32) -> Option<String> {
    http_get_from(tb, false, ip, port, secs)
}

/// [`http_get`] from the peer, or (`from_switch_host`) from the switch's host's kernel.
fn http_get_from(
    tb: &Testbed,
    from_switch_host: bool,
    ip: &str,
    port: u16,
    secs: u32,
) -> Option<String> {
    let py = format!(
        "import socket,sys\ns=socket.create_connection((\"{ip}\",{port}),timeout={secs})\ns.settimeout({secs})\ns.sendall(b\"GET / HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n\")\nd=b\"\"\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nsys.stdout.write(d.decode())\n"
    );
    let cmd = format!("timeout {} python3 -c '{}'", secs + 2, quote(&py));
    let out = if from_switch_host {
        tb.sw(&cmd)
    } else {
        tb.peer(&cmd)
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.starts_with("HTTP/1.0 200 OK\r\n") {
        return None;
    }
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// From the peer: connects with TCP, sends a line, expects it echoed. Bounded by `secs`.
fn tcp_echo(tb: &Testbed, ip: &str, port: u16, secs: u32) -> bool {
    let py = format!(
        "import socket,sys\ns=socket.create_connection((\"{ip}\",{port}),timeout={secs})\ns.settimeout({secs})\ns.sendall(b\"hello usnetd\\n\")\nd=b\"\"\nwhile not d.endswith(b\"\\n\"):\n  c=s.recv(100)\n  if not c: break\n  d+=c\nsys.exit(0 if d==b\"hello usnetd\\n\" else 1)\n"
    );
    tb.peer(&format!("timeout {} python3 -c '{}'", secs + 2, quote(&py)))
        .status
        .success()
}

/// From the peer: whether a TCP connection to ip:port gets any answer (SYN-ACK or RST) within
/// `secs`.
fn tcp_answers(tb: &Testbed, ip: &str, port: u16, secs: u32) -> bool {
    let py = format!(
        "import socket,sys\ntry:\n  socket.create_connection((\"{ip}\",{port}),timeout={secs})\nexcept ConnectionRefusedError:\n  sys.exit(0)\nexcept OSError:\n  sys.exit(1)\nsys.exit(0)\n"
    );
    tb.peer(&format!("timeout {} python3 -c '{}'", secs + 2, quote(&py)))
        .status
        .success()
}

fn wait_listen(tb: &Testbed, side: &str, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = if side == "sw" {
            tb.sw("ss -tln")
        } else {
            tb.peer("ss -tln")
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

/// Two counters summed over the workers, from one reading of stats.json; each is named by
/// its path in a worker's object (`["frames_in"]`, `["drops", "channel_full"]`).
fn worker_sums(tb: &Testbed, a: &[&str], b: &[&str]) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(tb.stats_path()).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let workers = v.get("sw0")?.get("workers")?.as_array()?;
    let field = |w: &serde_json::Value, path: &[&str]| {
        path.iter()
            .try_fold(w, |v, k| v.get(k))
            .and_then(serde_json::Value::as_u64)
    };
    let mut sum = (0, 0);
    for w in workers {
        sum.0 += field(w, a)?;
        sum.1 += field(w, b)?;
    }
    Some(sum)
}

/// `(frames_in, channel_full)` summed over the workers, from one reading of stats.json.
fn in_and_full(tb: &Testbed) -> Option<(u64, u64)> {
    worker_sums(tb, &["frames_in"], &["drops", "channel_full"])
}

/// Waits (at most 15 s) until the switch's frames_in count stays the same over two writes of
/// stats.json (written every second): it is done with what it received.
fn wait_settled(tb: &Testbed) {
    let mut last = None;
    poll_until(
        Duration::from_secs(15),
        Duration::from_millis(1100),
        || {
            let now = in_and_full(tb).map(|(i, _)| i);
            let settled = now.is_some() && now == last;
            last = now;
            settled
        },
        |settled| *settled,
    );
}

/// Waits (bounded) until `f` gives a value that `ok` accepts; returns the last value.
fn poll_until<T>(
    timeout: Duration,
    step: Duration,
    mut f: impl FnMut() -> T,
    ok: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        let v = f();
        if ok(&v) || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(step);
    }
}

static NEXT_CLIENT: AtomicUsize = AtomicUsize::new(0);

/// A control client of the test process itself (own socket path in the testbed's dir).
fn control_client(tb: &Testbed) -> Client {
    let path = tb.dir.join(format!(
        "test-client-{}",
        NEXT_CLIENT.fetch_add(1, Ordering::SeqCst)
    ));
    Client::connect(tb.control_socket(), path).expect("control client")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Uds,
    Shm,
}

/// A raw client of the test process: a control client with one packet channel.
struct RawClient {
    control: Client,
    channel: Box<dyn PacketChannel>,
}

impl RawClient {
    fn attach(tb: &Testbed, kind: Kind) -> RawClient {
        let control = control_client(tb);
        let pid = std::process::id() as i32;
        let channel: Box<dyn PacketChannel> = match kind {
            Kind::Uds => Box::new(UdsChannel::new(
                control.request_uds("sw0", pid).expect("RequestUDS"),
            )),
            Kind::Shm => {
                let (_, fds) = control.request_shm("sw0", pid).expect("RequestShm");
                let [memfd, to_client, to_switch]: [_; 3] =
                    fds.try_into().expect("three fds for a shm channel");
                Box::new(ShmClient::from_fds(memfd, [to_client, to_switch]).expect("map rings"))
            }
        };
        RawClient { control, channel }
    }

    fn listen_udp(&self, port: u16) {
        let ok = self
            .control
            .add_match(&UsnetMatch {
                dst_addr: WireIp::Ipv4(SW_IP.parse().unwrap()),
                dst_port: Some(port),
                src_addr: None,
                src_port: None,
                protocol: 17,
            })
            .expect("AddMatch");
        assert!(ok, "AddMatch UDP {port} refused");
    }

    /// Takes every frame pending now (never blocks).
    fn drain(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 2048];
        while let Ok(Some(n)) = self.channel.recv(&mut buf) {
            frames.push(buf[..n].to_vec());
        }
        frames
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        let _ = self.control.delete_client();
    }
}

/// The UDP payload of an IPv4 Ethernet frame to `port`.
fn udp_payload(frame: &[u8], port: u16) -> Option<&[u8]> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[9] != 17 || ip.len() < ihl + 8 {
        return None;
    }
    let udp = &ip[ihl..];
    if u16::from_be_bytes([udp[2], udp[3]]) != port {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    udp.get(8..len)
}

/// Local listening ports of all rules (QueryUsedPorts).
fn listening_ports(q: &Client) -> Vec<u16> {
    q.query_used_ports()
        .expect("QueryUsedPorts")
        .listening
        .iter()
        .map(|(_, _, port)| *port)
        .collect()
}

/// One client never reads and is flooded; the other gets all of its frames.
fn flood(tb: &Testbed, flooded_kind: Kind, reader_kind: Kind, ports: (u16, u16)) {
    // Large frames: the switch gives a UDS channel 8 MiB of socket buffer (about 3,500 such
    // frames), a shared-memory channel 1,024 slots per worker.
    const FLOOD: usize = 6_000;
    const ROUNDS: usize = 100;
    const PER_ROUND: usize = 10;
    let (flood_port, reader_port) = ports;
    let mut flooded = RawClient::attach(tb, flooded_kind);
    flooded.listen_udp(flood_port);
    let mut reader = RawClient::attach(tb, reader_kind);
    reader.listen_udp(reader_port);
    let (in_before, full_before) = poll_until(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || in_and_full(tb),
        Option::is_some,
    )
    .expect("stats.json readable");

    // Phase 1 fills the flooded client's channel. Then the switch is let settle (so that the
    // NIC's rings, which the flood may have overrun, are empty again), and phase 2 interleaves
    // the flooded client's frames with the reader's numbered frames, a little paced.
    let send = |py: String| {
        let out = tb.peer(&format!("timeout 60 python3 -c '{}'", quote(&py)));
        assert!(
            out.status.success(),
            "UDP sender failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let head = format!(
        "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nf=(\"{SW_IP}\",{flood_port})\nr=(\"{SW_IP}\",{reader_port})\nbig=b\"x\"*1400\n"
    );
    send(format!(
        "{head}for i in range({FLOOD}):\n  s.sendto(big,f)\n"
    ));
    wait_settled(tb);
    // On a loaded machine many frames can be lost before the switch (the veth or the NIC
    // rings overflow): send more until the switch reports the flooded channel full (bounded).
    for _ in 0..10 {
        match in_and_full(tb) {
            Some((_, full)) if full > full_before => break,
            _ => {}
        }
        send(format!("{head}for i in range(1000):\n  s.sendto(big,f)\n"));
        wait_settled(tb);
    }
    // Frames the veth drops before the switch (its backlog overflows when the machine is
    // loaded) are counted as peer0's tx_dropped; the reader may miss only that many.
    let veth_dropped = || -> u64 {
        let out = tb.peer("cat /sys/class/net/peer0/statistics/tx_dropped");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    let dropped_before = veth_dropped();
    send(format!(
        "{head}for i in range({ROUNDS}):\n  for j in range({PER_ROUND}):\n    s.sendto(big,f)\n  s.sendto(b\"frame %d\" % i,r)\n  time.sleep(0.002)\n"
    ));
    let lost_before_switch = veth_dropped() - dropped_before;

    let mut got = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while (got.len() as u64 + lost_before_switch) < ROUNDS as u64 && Instant::now() < deadline {
        for frame in reader.drain() {
            if let Some(p) = udp_payload(&frame, reader_port) {
                got.insert(String::from_utf8_lossy(p).into_owned());
            }
        }
        let _ = reader.channel.wait(Some(Duration::from_millis(50)));
    }
    let sent = (FLOOD + ROUNDS * PER_ROUND) as u64;
    // The flooded client reads what its channel held. Every other frame of its flow that
    // reached the switch must be counted as channel_full. Frames can be lost before the switch
    // (the NIC's rings overflow under the flood), so the reference is the switch's own count of
    // frames in: wait until stats.json (written every second) is settled and accounts for them.
    let mut queued = flooded.drain().len() as u64;
    let mut last = None;
    let (frames_in, full) = poll_until(
        Duration::from_secs(15),
        Duration::from_millis(1100),
        || {
            queued += flooded.drain().len() as u64;
            let (i, f) = in_and_full(tb).unwrap_or((in_before, full_before));
            let now = (i - in_before, f - full_before);
            let settled = last == Some(now);
            last = Some(now);
            (now, settled && queued + now.1 + got.len() as u64 >= now.0)
        },
        |&(_, done)| done,
    )
    .0;
    eprintln!(
        "flood ({flooded_kind:?} flooded, {reader_kind:?} reader): reader got {}/{ROUNDS}; \
         {sent} flood frames sent, {frames_in} frames in at the switch, flooded client had \
         {queued} queued, channel_full +{full}",
        got.len()
    );
    let all: std::collections::BTreeSet<String> =
        (0..ROUNDS).map(|i| format!("frame {i}")).collect();
    assert!(
        got.is_subset(&all) && got.len() as u64 + lost_before_switch >= ROUNDS as u64,
        "the reader did not get all of its frames next to a flooded client: got {} of {ROUNDS}, \
         {lost_before_switch} frames dropped by the veth before the switch",
        got.len()
    );
    assert!(
        full > 0 && queued + (ROUNDS as u64) < frames_in,
        "the flooded client's channel held everything: the test did not flood it"
    );
    // Besides the two flows only a few ARP frames pass (and their copies to the flooded client).
    let accounted = queued + full + got.len() as u64;
    assert!(
        accounted + 16 >= frames_in && accounted <= frames_in + 16,
        "{frames_in} frames in, but the flooded client's {queued} queued + {full} channel_full \
         drops + the reader's {ROUNDS} frames do not account for them"
    );
}

fn scenario(backend: &str) {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    for tool in ["socat", "python3", "ss", "ping"] {
        if !have(tool) {
            panic!("{tool} is missing: install it (see .ci/run)");
        }
    }
    // The two scenarios pin workers to the same two cores: one at a time.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let service_bin = service_binary();
    assert!(service_bin.exists());

    let tb = Testbed::up(&backend[..1]);
    let _kernel_debug = tb.spawn("sw", "socat TCP-LISTEN:2222,reuseaddr,fork EXEC:cat");
    let _peer_echo = tb.spawn("peer", "socat TCP-LISTEN:3333,reuseaddr,fork EXEC:cat");
    wait_listen(&tb, "sw", 2222);
    wait_listen(&tb, "peer", 3333);

    // The static Unix datagram client exists before the switch starts.
    let static_path = tb.dir.join("static.sock");
    let static_client = UnixDatagram::bind(&static_path).expect("bind static socket");
    static_client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let static_uds = format!("sw0:UDP:5000@{}", static_path.display());

    let mut daemon = Daemon::start(
        &tb,
        &[
            ("BACKEND", backend),
            ("CORES", "0-1"),
            ("DEBUG_PORTS", "sw0:TCP:2222"),
            ("STATIC_UDS", &static_uds),
        ],
    );
    let ctl = tb.control_socket();
    let ctl = ctl.to_str().unwrap();
    let connect_to = format!("{PEER_IP}:3333");

    // a + b: the service on the kernel's IP, with an outgoing connection.
    let a = Service::start(
        &tb,
        "svc-a",
        &[
            "--connect",
            &connect_to,
            ctl,
            "sw0",
            "10.77.0.2/24",
            PEER_IP,
            "7",
            "8080",
        ],
    );
    assert!(
        a.out
            .wait_for("connect: got 'hello from smoltcp'", Duration::from_secs(30)),
        "service A's outgoing connection failed: {}",
        a.out.text()
    );
    assert_eq!(
        http_get(&tb, SW_IP, 8080, 10).as_deref(),
        Some(HTTP_BODY),
        "the userspace service did not answer HTTP on {SW_IP}:8080"
    );
    assert!(
        tcp_echo(&tb, SW_IP, 7, 10),
        "the userspace echo port did not echo"
    );
    assert!(
        tcp_echo(&tb, SW_IP, 2222, 10),
        "the kernel's DEBUG_PORTS server did not answer through the switch"
    );
    assert!(
        !tcp_answers(&tb, SW_IP, 8081, 3),
        "a port nobody registered was answered"
    );

    // e: a second service with its own IP and MAC over shared memory, with a connection.
    let mut b = Service::start(
        &tb,
        "svc-b",
        &[
            "--channel",
            "shm",
            "--connect",
            &connect_to,
            ctl,
            "sw0",
            "10.77.0.3/24",
            PEER_IP,
            "9",
            "8090",
            "02:00:00:77:00:03",
        ],
    );
    assert!(
        b.out
            .wait_for("connect: got 'hello from smoltcp'", Duration::from_secs(30)),
        "service B's (shm) outgoing connection failed: {}",
        b.out.text()
    );
    assert_eq!(
        http_get(&tb, "10.77.0.3", 8090, 10).as_deref(),
        Some(HTTP_BODY),
        "the shm service did not answer HTTP"
    );
    // Any answer will do: smoltcp drops an echo request while it resolves the peer's MAC, and
    // on a busy machine answers can take a second or more.
    assert!(
        tb.peer("ping -c 8 -i 0.5 -W 5 10.77.0.3").status.success(),
        "the service on its own IP does not answer pings"
    );
    // The switch's host's kernel reaches the service through the switch (frames to a local
    // endpoint's MAC are switched locally). Its first segment teaches the switch the kernel's
    // connection rule; the rest must still go to the service, not out of the NIC (with xdp:
    // not by the kernel's egress fast path, which the service's MAC stops).
    assert_eq!(
        http_get_from(&tb, true, "10.77.0.3", 8090, 10).as_deref(),
        Some(HTTP_BODY),
        "the shm service did not answer HTTP from the switch's host"
    );

    // c: kill B; its rules disappear, A keeps working.
    let q = control_client(&tb);
    let ports = listening_ports(&q);
    assert!(
        [7, 8080, 9, 8090].iter().all(|p| ports.contains(p)),
        "QueryUsedPorts misses a service port: {ports:?}"
    );
    let killed = Instant::now();
    b.kill9();
    let ports = poll_until(
        Duration::from_secs(5),
        Duration::from_millis(5),
        || listening_ports(&q),
        |ports| !ports.contains(&8090) && !ports.contains(&9),
    );
    let took = killed.elapsed();
    eprintln!("rules of the SIGKILLed client gone after {took:?}");
    assert!(
        !ports.contains(&8090) && !ports.contains(&9),
        "rules of a SIGKILLed client still there after 5 s: {ports:?}"
    );
    assert!(
        ports.contains(&8080) && ports.contains(&7),
        "the surviving client lost its rules: {ports:?}"
    );
    assert_eq!(
        http_get(&tb, SW_IP, 8080, 10).as_deref(),
        Some(HTTP_BODY),
        "service A stopped answering after B was killed"
    );
    assert!(
        !tcp_answers(&tb, "10.77.0.3", 8090, 3),
        "the killed service's port still answers"
    );

    // d + e: flooded clients do not stop others.
    flood(&tb, Kind::Uds, Kind::Shm, (6000, 6001));
    flood(&tb, Kind::Shm, Kind::Uds, (6002, 6003));

    // f: the static Unix datagram client.
    let mut buf = [0u8; 2048];
    let mut frame = None;
    for _ in 0..3 {
        let out = tb.peer(&format!(
            "python3 -c 'import socket; socket.socket(socket.AF_INET,socket.SOCK_DGRAM).sendto(b\"static hello\",(\"{SW_IP}\",5000))'"
        ));
        assert!(out.status.success());
        // Copies of ARP frames come here too: look for the datagram (at most 2 s per try).
        while let Ok(n) = static_client.recv(&mut buf) {
            if udp_payload(&buf[..n], 5000).is_some() {
                frame = Some(buf[..n].to_vec());
                break;
            }
        }
        if frame.is_some() {
            break;
        }
    }
    let frame = frame.expect("the static client got no frame within 3 tries");
    assert_eq!(
        udp_payload(&frame, 5000),
        Some(&b"static hello"[..]),
        "the static client got something else: {frame:02x?}"
    );

    drop(a);
    let st = daemon.signal("TERM");
    assert!(st.success(), "usnetd exited with {st} after SIGTERM");
}

#[test]
fn packet_backend_clients() {
    scenario("packet");
}

#[test]
fn xdp_backend_clients() {
    scenario("xdp");
}

/// From the peer: sends `mib` MiB of patterned bytes over TCP to ip:port and half-closes;
/// the server answers with something computed over all of it. Returns the answer.
fn tcp_bulk(tb: &Testbed, ip: &str, port: u16, mib: usize, echo: bool) -> Option<String> {
    let py = format!(
        "import socket,sys,hashlib,threading\n\
data=bytes(range(251))*({mib}*1048576//251)\n\
s=socket.create_connection((\"{ip}\",{port}),timeout=20)\n\
s.settimeout(20)\n\
got=bytearray()\n\
def rd():\n  while True:\n    c=s.recv(1<<16)\n    if not c: return\n    got.extend(c)\n\
t=threading.Thread(target=rd,daemon=True)\nt.start()\n\
s.sendall(data)\ns.shutdown(socket.SHUT_WR)\nt.join(30)\n\
if {echo}:\n  print(\"echo ok\" if bytes(got)==data else \"echo MISMATCH %d/%d\"%(len(got),len(data)))\n\
else:\n  print(\"hash ok\" if got.decode().split()[0]==hashlib.sha256(data).hexdigest() else \"hash MISMATCH\")\n",
        echo = if echo { "True" } else { "False" },
    );
    let out = tb.peer(&format!("timeout 60 python3 -c '{}'", quote(&py)));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        eprintln!(
            "tcp_bulk to {ip}:{port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(text)
}

/// The kernel's frames sent out by the egress fast path from its listening rules, from
/// stats.json (0 without the fast path).
fn frames_out_by_kernel_listening_rules(tb: &Testbed) -> u64 {
    std::fs::read_to_string(tb.stats_path())
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["sw0"]["kernel_fast_path"]["frames_out_by_listening_rules"].as_u64())
        .unwrap_or(0)
}

/// With the veth's offloads on, the peer's TCP sends 64 KiB super-segments with partial
/// checksums (as a NIC with GRO hands them to the host). They must reach the kernel whole
/// (vnet headers through the switch) and a userspace client as correct wire frames (cut in
/// software), byte for byte. The kernel's own super-segments must leave whole: through the
/// switch (`fast_path` false: NO_KERNEL_FAST_PATH), or from the TAP's egress straight out.
fn super_segments(backend: &str, fast_path: bool) {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    for tool in ["socat", "python3", "ss", "ethtool", "sha256sum"] {
        if !have(tool) {
            panic!("{tool} is missing: install it (see .ci/run)");
        }
    }
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let tb = Testbed::up_with(
        &format!("g{}{}", &backend[..1], if fast_path { "f" } else { "s" }),
        "on",
    );
    let _kernel = tb.spawn(
        "sw",
        "socat TCP-LISTEN:2222,reuseaddr,fork SYSTEM:sha256sum",
    );
    // The kernel's side sends 16 MiB of the same pattern to whoever connects.
    let _kernel_source = tb.spawn(
        "sw",
        "socat TCP-LISTEN:2223,reuseaddr,fork 'SYSTEM:yes usnetd-pattern 2>/dev/null | head -c 16777216'",
    );
    wait_listen(&tb, "sw", 2222);
    wait_listen(&tb, "sw", 2223);
    let mut daemon = Daemon::start(
        &tb,
        &[
            ("BACKEND", backend),
            ("CORES", "0-1"),
            ("DEBUG_PORTS", "sw0:TCP:2222,sw0:TCP:2223"),
            (
                "NO_KERNEL_FAST_PATH",
                if fast_path { "false" } else { "true" },
            ),
        ],
    );
    let ctl = tb.control_socket();
    let service = Service::start(
        &tb,
        "svc-gso",
        &[
            ctl.to_str().unwrap(),
            "sw0",
            "10.77.0.2/24",
            PEER_IP,
            "7",
            "8080",
        ],
    );

    assert_eq!(
        tcp_bulk(&tb, SW_IP, 2222, 16, false).as_deref(),
        Some("hash ok"),
        "16 MiB to the kernel through the switch arrived damaged or not at all"
    );
    // Wait until stats.json shows the transfer (rewritten every second).
    let (frames, bytes) = poll_until(
        Duration::from_secs(10),
        Duration::from_millis(200),
        || worker_sums(&tb, &["frames_in"], &["bytes_in"]).unwrap_or((0, 0)),
        |&(_, b)| b >= 16 << 20,
    );
    assert!(
        bytes >= 16 << 20,
        "the switch counted only {bytes} bytes in"
    );
    assert!(
        bytes / frames.max(1) > 1514,
        "{frames} frames for {bytes} bytes: super-segments were not passed whole"
    );
    // The kernel's own super-segments leave through the switch whole (the veth does TSO).
    let pull = "import socket,sys\n\
s=socket.create_connection((\"10.77.0.2\",2223),timeout=20)\n\
s.settimeout(20)\ngot=bytearray()\n\
while True:\n  c=s.recv(1<<16)\n  if not c: break\n  got.extend(c)\n\
want=(b\"usnetd-pattern\\n\"*(16777216//15+1))[:16777216]\n\
print(\"pull ok\" if bytes(got)==want else \"pull MISMATCH %d\"%len(got))\n";
    // Frames so far (the upload's ACKs, some of which stats.json may not show yet).
    let fast_before = frames_out_by_kernel_listening_rules(&tb);
    let out = tb.peer(&format!("timeout 60 python3 -c '{}'", quote(pull)));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pull ok",
        "16 MiB from the kernel through the switch arrived damaged or not at all: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if fast_path {
        // All of it from the listening rule's port, so by the fast path: at least 256 frames
        // (64 KiB at most each), and whole, so fewer than 16 MiB of wire frames (11,586 of
        // 1448 bytes): TCP makes super-segments of 2 MSS at least (tcp_min_tso_segs), at most
        // 5,794 frames, and the upload's late-counted ACKs are a few hundred.
        let min = (16 << 20) / 65536;
        let sent = poll_until(
            Duration::from_secs(10),
            Duration::from_millis(200),
            || frames_out_by_kernel_listening_rules(&tb).saturating_sub(fast_before),
            |&n| n >= min,
        );
        eprintln!("16 MiB from the kernel left the fast path in {sent} frames");
        assert!(
            sent >= min,
            "only {sent} frames from the fast path for 16 MiB: not all left by it"
        );
        assert!(
            sent < (16 << 20) / 1448,
            "{sent} frames from the fast path for 16 MiB: the kernel's super-segments were cut"
        );
    } else {
        let (frames_out, bytes_out) = poll_until(
            Duration::from_secs(10),
            Duration::from_millis(200),
            || worker_sums(&tb, &["frames_out"], &["bytes_out"]).unwrap_or((0, 0)),
            |&(_, b)| b >= 16 << 20,
        );
        assert!(
            bytes_out >= 16 << 20 && bytes_out / frames_out.max(1) > 1514,
            "{frames_out} frames for {bytes_out} bytes out: the kernel's super-segments were cut"
        );
    }
    assert_eq!(
        tcp_bulk(&tb, SW_IP, 7, 2, true).as_deref(),
        Some("echo ok"),
        "2 MiB echoed by the userspace service arrived damaged or not at all"
    );
    drop(service);
    let st = daemon.signal("TERM");
    assert!(st.success(), "usnetd exited with {st} after SIGTERM");
}

#[test]
fn packet_backend_super_segments() {
    super_segments("packet", false);
}

#[test]
fn macvtap_backend_super_segments() {
    super_segments("macvtap", false);
}

#[test]
fn packet_backend_super_segments_with_kernel_fast_path() {
    super_segments("packet", true);
}
