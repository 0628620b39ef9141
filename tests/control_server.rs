//! The control server over real Unix sockets in a temporary directory (no root needed), with
//! fake channels, a fake worker assigner and a fake kernel, and real rule tables.

use std::io::IoSliceMut;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use usnetd::control::{
    bind_control_socket, ChannelFactory, ChannelHandover, ClientLimits, ControlServer, KernelPorts,
    NicControl, SourceAssigner,
};
use usnetd_client::protocol::{ShmChannelInfo, UsnetMatch, WireIp};
use usnetd_client::Client;
use usnetd_shards::endpoint::{EndpointId, EndpointSink};
use usnetd_shards::key::{FlowKey, Ip};
use usnetd_shards::port::{FrameBatch, RxQueue};
use usnetd_shards::table::Table;

struct NullSink;
impl EndpointSink for NullSink {
    fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
        frames.len()
    }
}

struct NullSource;
impl RxQueue for NullSource {
    fn recv<'a>(&'a mut self, _batch: &mut FrameBatch<'a>) -> usize {
        0
    }
}

/// Socket pairs (the switch end kept alive in `keep`); shm: a socket fd plus the write end of
/// a pipe whose read end is the hang-up fd.
struct FakeChannels;
impl ChannelFactory for FakeChannels {
    fn create_uds(&self, _nic: &str) -> std::io::Result<ChannelHandover> {
        let (switch_end, client_end) = UnixDatagram::pair()?;
        Ok(ChannelHandover {
            client_fds: vec![OwnedFd::from(client_end)],
            sink: Arc::new(NullSink),
            source: Box::new(NullSource),
            hangup: None,
            keep: Some(Box::new(switch_end)),
        })
    }
    fn create_shm(&self, _nic: &str) -> std::io::Result<(ShmChannelInfo, ChannelHandover)> {
        let (a, b) = UnixDatagram::pair()?;
        let (read, write) = nix::unistd::pipe()?;
        let info = ShmChannelInfo {
            version: 1,
            map_size: 8192,
            to_client_rings: 2,
            to_switch_rings: 1,
            slots: 64,
            slot_size: 2048,
        };
        Ok((
            info,
            ChannelHandover {
                client_fds: vec![OwnedFd::from(a), write],
                sink: Arc::new(NullSink),
                source: Box::new(NullSource),
                hangup: Some(read),
                keep: Some(Box::new(b)),
            },
        ))
    }
}

/// Records attach/detach calls.
#[derive(Clone, Default)]
struct Assigner {
    attached: Arc<Mutex<Vec<(String, EndpointId)>>>,
    detached: Arc<Mutex<Vec<(String, EndpointId)>>>,
}
impl SourceAssigner for Assigner {
    fn attach(&self, nic: &str, endpoint: EndpointId, _source: Box<dyn RxQueue>) {
        self.attached.lock().unwrap().push((nic.into(), endpoint));
    }
    fn detach(&self, nic: &str, endpoint: EndpointId) {
        self.detached.lock().unwrap().push((nic.into(), endpoint));
    }
}

/// The kernel owns 10.0.0.2 on eth0, listens on TCP 22, ephemeral ports 32768-60999.
struct FakeKernel;
impl KernelPorts for FakeKernel {
    fn kernel_listens(&self, proto: u8, _ip: IpAddr, port: u16) -> bool {
        proto == 6 && port == 22
    }
    fn ephemeral_range(&self) -> (u16, u16) {
        (32768, 60999)
    }
    fn is_kernel_ip(&self, nic: &str, ip: IpAddr) -> bool {
        nic == "eth0" && ip == "10.0.0.2".parse::<IpAddr>().unwrap()
    }
}

static DIR_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A server on a temporary control socket, run by a thread; stopped and cleaned up on drop.
struct Harness {
    dir: PathBuf,
    control: PathBuf,
    table: Arc<Mutex<Table>>,
    assigner: Assigner,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    clients: AtomicUsize,
}

impl Harness {
    fn new(limits: ClientLimits) -> Harness {
        let dir = std::env::temp_dir().join(format!(
            "usnetd-control-test-{}-{}",
            std::process::id(),
            DIR_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let control = dir.join("usnetd.socket");
        let socket = bind_control_socket(&control, None).unwrap();
        let table = Arc::new(Mutex::new(Table::new()));
        let assigner = Assigner::default();
        let mut server = ControlServer::new(
            socket,
            vec![NicControl {
                name: "eth0".into(),
                table: table.clone(),
            }],
            Box::new(FakeChannels),
            Box::new(assigner.clone()),
            Box::new(FakeKernel),
            limits,
        )
        .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                server.poll_once(Duration::from_millis(20)).unwrap();
            }
        });
        Harness {
            dir,
            control,
            table,
            assigner,
            stop,
            thread: Some(thread),
            clients: AtomicUsize::new(0),
        }
    }

    fn client_path(&self) -> PathBuf {
        self.dir.join(format!(
            "client-{}",
            self.clients.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn client(&self) -> Client {
        let c = Client::connect(&self.control, self.client_path()).unwrap();
        c.set_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    fn attached_client(&self) -> Client {
        let c = self.client();
        c.request_uds("eth0", pid()).unwrap();
        c
    }

    fn owner(&self, key: &FlowKey) -> Option<EndpointId> {
        self.table.lock().unwrap().rule(key).map(|r| r.endpoint)
    }

    fn rule_count(&self) -> usize {
        self.table.lock().unwrap().rule_count()
    }

    /// Waits (bounded) until `endpoint` was detached.
    fn wait_detached(&self, endpoint: EndpointId) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self
                .assigner
                .detached
                .lock()
                .unwrap()
                .iter()
                .any(|(_, e)| *e == endpoint)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn last_attached(&self) -> EndpointId {
        self.assigner.attached.lock().unwrap().last().unwrap().1
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pid() -> i32 {
    std::process::id() as i32
}

fn rule(dst: &str, dport: u16, src: Option<(&str, u16)>, proto: u8) -> UsnetMatch {
    UsnetMatch {
        dst_addr: WireIp::from(dst.parse::<IpAddr>().unwrap()),
        dst_port: Some(dport),
        src_addr: src.map(|(a, _)| WireIp::from(a.parse::<IpAddr>().unwrap())),
        src_port: src.map(|(_, p)| p),
        protocol: proto,
    }
}

fn key(dst: [u8; 4], dport: u16, src: Option<([u8; 4], u16)>, proto: u8) -> FlowKey {
    FlowKey {
        local_ip: Ip::v4(dst),
        remote_ip: src.map_or(Ip::UNSPECIFIED, |(a, _)| Ip::v4(a)),
        local_port: dport,
        remote_port: src.map_or(0, |(_, p)| p),
        proto,
    }
}

/// A raw client socket (no client library): sends bytes, receives bytes + fds + sender path.
struct Raw {
    socket: UnixDatagram,
}

impl Raw {
    fn bind(path: &Path) -> Raw {
        let socket = UnixDatagram::bind(path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Raw { socket }
    }

    fn send(&self, control: &Path, bytes: &[u8]) {
        assert_eq!(self.socket.send_to(bytes, control).unwrap(), bytes.len());
    }

    fn recv(&self) -> (Vec<u8>, Vec<OwnedFd>, Option<PathBuf>) {
        let mut buf = vec![0u8; 1_000_000];
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<UnixAddr>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .expect("an answer within the timeout");
        let mut fds = vec![];
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: fresh fds installed by the kernel for this message; we own them.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let from = msg.address.and_then(|a| a.path().map(Path::to_path_buf));
        let len = msg.bytes;
        buf.truncate(len);
        (buf, fds, from)
    }

    /// Asserts that nothing arrives within a short while.
    fn assert_silent(&self) {
        self.socket
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut buf = [0u8; 16];
        let r = self.socket.recv(&mut buf);
        assert!(
            r.is_err(),
            "unexpected answer {:?}",
            r.map(|n| buf[..n].to_vec())
        );
        self.socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
    }
}

#[test]
fn raw_json_bytes_as_protocol_md() {
    let h = Harness::new(ClientLimits::default());
    let raw = Raw::bind(&h.client_path());
    // RequestUDS: `$` and one fd, from the control path.
    raw.send(
        &h.control,
        format!(r#"{{"RequestUDS":["eth0",{}]}}"#, pid()).as_bytes(),
    );
    let (bytes, fds, from) = raw.recv();
    assert_eq!(bytes, b"$");
    assert_eq!(fds.len(), 1);
    assert_eq!(from.as_deref(), Some(h.control.as_path()));
    // The fd is a datagram socket whose peer (the switch's end) is alive.
    let channel = UnixDatagram::from(fds.into_iter().next().unwrap());
    assert_eq!(channel.send(b"frame").unwrap(), 5);

    // AddMatch examples of PROTOCOL.md (10.0.0.2 as local address; the connection's port
    // 40001 is in the kernel's ephemeral range, so use a non-kernel address for it).
    let listen = br#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":8080,"src_addr":null,"src_port":null,"protocol":6}}"#;
    raw.send(&h.control, listen);
    assert_eq!(raw.recv().0, b"OK");
    raw.send(&h.control, listen);
    assert_eq!(raw.recv().0, b"ER");
    let conn = br#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.3"},"dst_port":40001,"src_addr":{"Ipv4":"10.0.0.1"},"src_port":443,"protocol":6}}"#;
    raw.send(&h.control, conn);
    assert_eq!(raw.recv().0, b"OK");
    assert!(h.owner(&key([10, 0, 0, 2], 8080, None, 6)).is_some());
    assert!(h
        .owner(&key([10, 0, 0, 3], 40001, Some(([10, 0, 0, 1], 443)), 6))
        .is_some());

    raw.send(&h.control, br#""QueryUsedPorts""#);
    let (bytes, fds, _) = raw.recv();
    assert!(fds.is_empty());
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        r#"{"QueryUsedPortsAnswer":{"listening":[[6,{"Ipv4":"10.0.0.2"},8080]],"connected":[[6,{"Ipv4":"10.0.0.3"},40001]]}}"#
    );

    // RemoveMatch: no answer, rule gone.
    raw.send(
        &h.control,
        br#"{"RemoveMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":8080,"src_addr":null,"src_port":null,"protocol":6}}"#,
    );
    raw.assert_silent();
    assert!(h.owner(&key([10, 0, 0, 2], 8080, None, 6)).is_none());

    // DeleteClient: no answer, everything gone.
    let ep = h.last_attached();
    raw.send(&h.control, br#""DeleteClient""#);
    raw.assert_silent();
    assert!(h.wait_detached(ep));
    assert_eq!(h.rule_count(), 0);
    assert!(h.table.lock().unwrap().endpoint(ep).is_none());
}

#[test]
fn bad_requests_get_er_and_the_server_keeps_working() {
    let h = Harness::new(ClientLimits::default());
    let raw = Raw::bind(&h.client_path());
    for bad in [
        &br#"{"AddMatch":"#[..],
        br#""Frobnicate""#,
        br#"{"Frobnicate":[1,2]}"#,
        b"end",
        b"\xff\xfe\x00",
        b"",
        br#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":80,"src_addr":null,"src_port":null,"protocol":6}}"#, // no channel yet
        br#"{"RequestUDS":["nosuchif",1]}"#,
        br#"{"RequestNetmapPipe":["eth0",1]}"#, // no netmap support
        br#"{"AddMatch":{"dst_addr":{"Ipv6":"::1"},"dst_port":80,"src_addr":null,"src_port":null,"protocol":6}}"#,
    ] {
        raw.send(&h.control, bad);
        assert_eq!(raw.recv().0, b"ER", "{:?}", String::from_utf8_lossy(bad));
    }
    // Oversized datagram.
    let mut big = br#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":80,"src_addr":null,"src_port":null,"protocol":6}}"#.to_vec();
    big.resize(5000, b' ');
    raw.send(&h.control, &big);
    assert_eq!(raw.recv().0, b"ER");
    // Undecodable requests that have no answer get none (no stray ER).
    raw.send(&h.control, br#"{"RemoveMatch":{"bogus":1}}"#);
    raw.send(&h.control, br#""DeleteClient""#); // unknown client: ignored
    raw.send(
        &h.control,
        br#"{"QueryUsedPortsAnswer":{"listening":[],"connected":[]}}"#,
    );
    raw.send(&h.control, br#""QueryUsedPorts""#);
    let (bytes, _, _) = raw.recv();
    assert_eq!(
        bytes,
        br#"{"QueryUsedPortsAnswer":{"listening":[],"connected":[]}}"#
    );

    // A sender that never bound a path cannot be answered; the server must survive it.
    let unbound = UnixDatagram::unbound().unwrap();
    unbound.send_to(br#""QueryUsedPorts""#, &h.control).unwrap();
    unbound.send_to(b"garbage", &h.control).unwrap();

    // An abstract sender cannot be tied to a client: ER.
    let abstract_sender = Raw {
        socket: UnixDatagram::bind_addr(
            &std::os::unix::net::SocketAddr::from_abstract_name(format!("usnetd-test-{}", pid()))
                .unwrap(),
        )
        .unwrap(),
    };
    abstract_sender
        .socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    abstract_sender.send(&h.control, br#""QueryUsedPorts""#);
    assert_eq!(abstract_sender.recv().0, b"ER");

    // Still works for a proper client.
    let c = h.attached_client();
    assert!(c.add_match(&rule("10.0.0.2", 8080, None, 6)).unwrap());
}

#[test]
fn ownership_of_rules_and_ports() {
    let h = Harness::new(ClientLimits::default());
    let a = h.attached_client();
    let ep_a = h.last_attached();
    let b = h.attached_client();
    let ep_b = h.last_attached();
    assert_ne!(ep_a, ep_b);

    let listen = rule("10.0.0.2", 8080, None, 6);
    assert!(a.add_match(&listen).unwrap());
    assert!(!a.add_match(&listen).unwrap(), "exact clash");
    assert!(!b.add_match(&listen).unwrap(), "exact clash, other client");
    // B cannot remove A's rule.
    b.remove_match(&listen).unwrap();
    // B cannot add a connection under A's listening port.
    assert!(!b
        .add_match(&rule("10.0.0.2", 8080, Some(("10.0.0.1", 5555)), 6))
        .unwrap());
    // ... but A can, and B can listen elsewhere.
    assert!(a
        .add_match(&rule("10.0.0.2", 8080, Some(("10.0.0.1", 5555)), 6))
        .unwrap());
    assert!(b.add_match(&rule("10.0.0.2", 8081, None, 6)).unwrap());
    assert_eq!(h.owner(&key([10, 0, 0, 2], 8080, None, 6)), Some(ep_a));
    // B has a connection on port 9000; A may not listen there.
    assert!(b
        .add_match(&rule("10.0.0.2", 9000, Some(("10.0.0.1", 80)), 6))
        .unwrap());
    assert!(!a.add_match(&rule("10.0.0.2", 9000, None, 6)).unwrap());
    // Other protocol, same port: independent.
    assert!(a.add_match(&rule("10.0.0.2", 9000, None, 17)).unwrap());

    let used = a.query_used_ports().unwrap();
    assert_eq!(
        used.listening,
        vec![
            (6, WireIp::Ipv4("10.0.0.2".parse().unwrap()), 8080),
            (6, WireIp::Ipv4("10.0.0.2".parse().unwrap()), 8081),
            (17, WireIp::Ipv4("10.0.0.2".parse().unwrap()), 9000),
        ]
    );
    assert_eq!(
        used.connected,
        vec![
            (6, WireIp::Ipv4("10.0.0.2".parse().unwrap()), 8080),
            (6, WireIp::Ipv4("10.0.0.2".parse().unwrap()), 9000),
        ]
    );

    // A removes its own rule; deleting B removes all of B's rules only.
    a.remove_match(&rule("10.0.0.2", 9000, None, 17)).unwrap();
    b.delete_client().unwrap();
    assert!(h.wait_detached(ep_b));
    assert_eq!(h.owner(&key([10, 0, 0, 2], 8081, None, 6)), None);
    assert_eq!(h.owner(&key([10, 0, 0, 2], 9000, None, 17)), None);
    assert_eq!(h.owner(&key([10, 0, 0, 2], 8080, None, 6)), Some(ep_a));
    assert_eq!(h.rule_count(), 2);
}

#[test]
fn kernel_ports_and_limits() {
    let limits = ClientLimits {
        max_clients: 2,
        max_channels_per_client: 1,
        max_rules_per_client: 3,
        ..ClientLimits::default()
    };
    let h = Harness::new(limits);
    let a = h.attached_client();
    // The kernel listens on TCP 22 (UDP 22 is free).
    assert!(!a.add_match(&rule("10.0.0.2", 22, None, 6)).unwrap());
    // A connection from a kernel ephemeral port on a kernel address is refused...
    assert!(!a
        .add_match(&rule("10.0.0.2", 40001, Some(("10.0.0.1", 443)), 6))
        .unwrap());
    // ... outside the range, or on another address, or listening, it is fine.
    assert!(a
        .add_match(&rule("10.0.0.2", 2000, Some(("10.0.0.1", 443)), 6))
        .unwrap());
    assert!(a
        .add_match(&rule("10.0.0.3", 40001, Some(("10.0.0.1", 443)), 6))
        .unwrap());
    assert!(a.add_match(&rule("10.0.0.2", 22, None, 17)).unwrap());
    // Rule limit (3).
    assert!(!a.add_match(&rule("10.0.0.2", 23, None, 17)).unwrap());
    a.remove_match(&rule("10.0.0.2", 22, None, 17)).unwrap();
    assert!(a.add_match(&rule("10.0.0.2", 23, None, 17)).unwrap());
    // Channel limit (1 per client).
    assert!(a.request_uds("eth0", pid()).is_err());
    // Client limit (2).
    let _b = h.attached_client();
    let c = h.client();
    assert!(c.request_uds("eth0", pid()).is_err());
}

#[test]
fn dead_client_is_removed() {
    let h = Harness::new(ClientLimits::default());
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let c = h.client();
    let _fd = c.request_uds("eth0", child.id() as i32).unwrap();
    let ep = h.last_attached();
    assert!(c.add_match(&rule("10.0.0.2", 8080, None, 6)).unwrap());
    assert_eq!(h.rule_count(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    // Noticed through the pidfd (the server polls with a 20 ms timeout).
    assert!(h.wait_detached(ep), "dead client not removed");
    assert_eq!(h.rule_count(), 0);
    assert!(h.table.lock().unwrap().endpoint(ep).is_none());
}

#[test]
fn shm_channel_and_hangup() {
    let h = Harness::new(ClientLimits::default());
    let c = h.client();
    let (info, fds) = c.request_shm("eth0", pid()).unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(fds.len(), 2);
    let ep = h.last_attached();
    assert!(c.add_match(&rule("10.0.0.2", 8080, None, 6)).unwrap());
    // The client closes its channel fds: the hang-up removes it.
    drop(fds);
    assert!(h.wait_detached(ep), "hung-up client not removed");
    assert_eq!(h.rule_count(), 0);
}

#[test]
fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let h = Harness::new(ClientLimits::default());
    // Live: refused.
    assert!(bind_control_socket(&h.control, None).is_err());
    // Stale: a socket file nobody is bound to any more.
    let stale = h.dir.join("stale.socket");
    drop(UnixDatagram::bind(&stale).unwrap());
    let s = bind_control_socket(&stale, None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&stale).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o770);
    drop(s);
    // Not a socket: refused, file kept.
    let file = h.dir.join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(bind_control_socket(&file, None).is_err());
    assert!(file.exists());
}
