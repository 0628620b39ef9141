//! A smoltcp service behind usnetd: a TCP echo port and a tiny HTTP server answering `GET /`
//! with a fixed body, attached to the switch's control socket with the client library.
//!
//! ```text
//! smoltcp_service [--channel uds|shm] [--connect IP:PORT]
//!                 <control-socket> <interface> <ip/prefix> <gateway> [echo-port] [http-port] [mac]
//! smoltcp_service /run/usnetd.socket eth0 10.0.0.2/24 10.0.0.1 7 8080
//! smoltcp_service --channel shm --connect 10.0.0.1:7 /run/usnetd.socket eth0 10.0.0.5/24 10.0.0.1
//! ```
//!
//! Without `mac`, the interface's MAC is used (the "Passthru" mode of existing clients). The
//! address may be the kernel's own (the service then shares it, port by port) or one of its
//! own; only in the latter case it registers ICMP too and answers pings (smoltcp does that).
//!
//! It asks for its packet channel (`RequestUDS`, a Unix datagram socket with one Ethernet frame
//! per datagram, or with `--channel shm` `RequestShm`, shared-memory rings), registers each
//! listening port with `AddMatch`, and runs smoltcp over the channel through a `phy::Device`
//! built on [`PacketChannel`]. With `--connect` it also opens one outgoing TCP connection: it
//! picks a local port in 1025-65535 outside the kernel's ephemeral range, registers the full
//! 5-tuple first (as existing clients do), sends one line, prints `connect: got '<line>'` (or
//! `connect: failed`) and keeps serving. It prints `ready` once attached and leaves cleanly
//! (`DeleteClient`) on SIGTERM or SIGINT.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use usnetd_client::channel::{PacketChannel, UdsChannel};
use usnetd_client::protocol::{UsnetMatch, WireIp};
use usnetd_client::shm::{ShmClient, SHM_VERSION};
use usnetd_client::Client;

/// The body `GET /` answers with.
const HTTP_BODY: &str = "hello from smoltcp behind usnetd\n";

/// A smoltcp device over any [`PacketChannel`] (Unix datagram socket or shared memory).
struct ChannelDevice<C: PacketChannel> {
    channel: C,
    rx: Vec<u8>,
    tx: Vec<u8>,
    mtu: usize,
}

impl<C: PacketChannel> ChannelDevice<C> {
    /// A device for an Ethernet with `mtu` (IP MTU, without the 14-byte header).
    fn new(channel: C, mtu: usize) -> Self {
        ChannelDevice {
            channel,
            rx: vec![0; mtu + 14],
            tx: vec![0; mtu + 14],
            mtu,
        }
    }
}

struct RxToken<'a>(&'a [u8]);

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

struct TxToken<'a, C: PacketChannel> {
    channel: &'a mut C,
    buf: &'a mut [u8],
}

impl<C: PacketChannel> phy::TxToken for TxToken<'_, C> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let len = len.min(self.buf.len());
        let r = f(&mut self.buf[..len]);
        // A full channel drops the frame, like a NIC; TCP retransmits.
        if let Err(e) = self.channel.send(&self.buf[..len]) {
            eprintln!("send: {e}");
        }
        r
    }
}

impl<C: PacketChannel> phy::Device for ChannelDevice<C> {
    type RxToken<'a>
        = RxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = TxToken<'a, C>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(RxToken<'_>, TxToken<'_, C>)> {
        let n = match self.channel.recv(&mut self.rx) {
            Ok(Some(n)) => n,
            Ok(None) => return None,
            Err(e) => {
                eprintln!("recv: {e}");
                return None;
            }
        };
        Some((
            RxToken(&self.rx[..n]),
            TxToken {
                channel: &mut self.channel,
                buf: &mut self.tx,
            },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxToken<'_, C>> {
        Some(TxToken {
            channel: &mut self.channel,
            buf: &mut self.tx,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.mtu + 14;
        caps.max_burst_size = Some(32);
        caps
    }
}

/// Connections served at once per port.
const SOCKETS_PER_PORT: usize = 4;

struct HttpConn {
    handle: SocketHandle,
    request: Vec<u8>,
}

/// The echo and HTTP service on one smoltcp interface.
struct Service {
    iface: Interface,
    sockets: SocketSet<'static>,
    echo_port: u16,
    http_port: u16,
    echo: Vec<SocketHandle>,
    http: Vec<HttpConn>,
    outgoing: Option<Outgoing>,
}

/// The line the outgoing connection sends.
const CONNECT_LINE: &[u8] = b"hello from smoltcp\n";

/// The outgoing connection of `--connect`.
struct Outgoing {
    handle: SocketHandle,
    local_port: u16,
    sent: bool,
    reply: Vec<u8>,
    /// What came back (`None`: failed), once known.
    result: Option<Option<String>>,
    /// Reported as finished by [`Service::take_finished`].
    taken: bool,
}

/// How the outgoing connection ended.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    local_port: u16,
    /// The line that came back, `None` when the connection failed.
    reply: Option<String>,
}

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 65535]),
        tcp::SocketBuffer::new(vec![0; 65535]),
    )
}

fn now() -> Instant {
    Instant::now()
}

impl Service {
    fn new<C: PacketChannel>(
        device: &mut ChannelDevice<C>,
        mac: EthernetAddress,
        ip: IpCidr,
        gateway: Option<Ipv4Address>,
        echo_port: u16,
        http_port: u16,
    ) -> Service {
        let mut iface = Interface::new(Config::new(HardwareAddress::Ethernet(mac)), device, now());
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(ip);
        });
        if let Some(gw) = gateway {
            let _ = iface.routes_mut().add_default_ipv4_route(gw);
        }
        let mut sockets = SocketSet::new(vec![]);
        let echo = (0..SOCKETS_PER_PORT)
            .map(|_| sockets.add(tcp_socket()))
            .collect();
        let http = (0..SOCKETS_PER_PORT)
            .map(|_| HttpConn {
                handle: sockets.add(tcp_socket()),
                request: Vec::new(),
            })
            .collect();
        Service {
            iface,
            sockets,
            echo_port,
            http_port,
            echo,
            http,
            outgoing: None,
        }
    }

    /// Opens the outgoing connection from `local_port` (already registered with the switch).
    fn connect(&mut self, remote: SocketAddrV4, local_port: u16) {
        let handle = self.sockets.add(tcp_socket());
        let cx = self.iface.context();
        let s = self.sockets.get_mut::<tcp::Socket>(handle);
        let endpoint = (IpAddress::Ipv4(*remote.ip()), remote.port());
        let failed = s.connect(cx, endpoint, local_port).is_err();
        self.outgoing = Some(Outgoing {
            handle,
            local_port,
            sent: false,
            reply: Vec::new(),
            result: failed.then_some(None),
            taken: false,
        });
        if failed {
            println!("connect: failed");
        }
    }

    /// Drives the outgoing connection: sends the line, collects the answer up to a newline,
    /// prints it, closes.
    fn drive_outgoing(&mut self) {
        let Some(o) = &mut self.outgoing else { return };
        let s = self.sockets.get_mut::<tcp::Socket>(o.handle);
        if o.result.is_some() {
            return;
        }
        if s.may_send() && !o.sent {
            o.sent = s.send_slice(CONNECT_LINE) == Ok(CONNECT_LINE.len());
        }
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = s.recv_slice(&mut buf) {
            o.reply.extend_from_slice(&buf[..n]);
        }
        if let Some(end) = o.reply.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&o.reply[..end]).into_owned();
            println!("connect: got '{line}'");
            o.result = Some(Some(line));
            s.close();
        } else if !s.is_open() || o.reply.len() > 4096 {
            println!("connect: failed");
            o.result = Some(None);
            s.abort();
        }
    }

    /// Once: how the outgoing connection ended, after its socket is fully closed.
    fn take_finished(&mut self) -> Option<Outcome> {
        let o = self.outgoing.as_mut()?;
        let state = self.sockets.get::<tcp::Socket>(o.handle).state();
        if o.taken || state != tcp::State::Closed {
            return None;
        }
        let reply = o.result.clone()?;
        o.taken = true;
        Some(Outcome {
            local_port: o.local_port,
            reply,
        })
    }

    /// Processes frames and sockets once; returns how long the stack may sleep.
    fn poll<C: PacketChannel>(&mut self, device: &mut ChannelDevice<C>) -> Option<Duration> {
        let t = now();
        self.iface.poll(t, device, &mut self.sockets);
        let mut buf = [0u8; 4096];
        for &h in &self.echo {
            let s = self.sockets.get_mut::<tcp::Socket>(h);
            if !s.is_open() {
                let _ = s.listen(self.echo_port);
            }
            // Echo only what fits the send buffer, so nothing is lost.
            while s.can_recv() && s.send_capacity() > s.send_queue() {
                let room = (s.send_capacity() - s.send_queue()).min(buf.len());
                match s.recv_slice(&mut buf[..room]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = s.send_slice(&buf[..n]);
                    }
                }
            }
            if !s.may_recv() && s.may_send() && s.send_queue() == 0 {
                s.close();
            }
        }
        for c in &mut self.http {
            let s = self.sockets.get_mut::<tcp::Socket>(c.handle);
            if !s.is_open() {
                c.request.clear();
                let _ = s.listen(self.http_port);
            }
            while s.can_recv() {
                match s.recv_slice(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => c.request.extend_from_slice(&buf[..n]),
                }
            }
            if c.request.len() > 8192 {
                s.abort();
                c.request.clear();
            } else if c.request.windows(4).any(|w| w == b"\r\n\r\n") && s.may_send() {
                let response = http_response(&c.request);
                let _ = s.send_slice(response.as_bytes());
                s.close();
                c.request.clear();
            }
        }
        self.drive_outgoing();
        self.iface.poll(now(), device, &mut self.sockets);
        self.iface
            .poll_delay(now(), &self.sockets)
            .map(Duration::from)
    }
}

/// The answer to one HTTP request.
fn http_response(request: &[u8]) -> String {
    let line = request.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(b"/")) => format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            HTTP_BODY.len(),
            HTTP_BODY
        ),
        _ => "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
    }
}

/// Which packet channel to ask the switch for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelKind {
    /// `RequestUDS`: a Unix datagram socket, one frame per datagram.
    Uds,
    /// `RequestShm`: shared-memory rings (extension).
    Shm,
}

/// The command line.
#[derive(Clone, Debug, PartialEq)]
struct Options {
    control: String,
    interface: String,
    ip: Ipv4Addr,
    prefix: u8,
    gateway: Ipv4Addr,
    echo_port: u16,
    http_port: u16,
    mac: Option<EthernetAddress>,
    channel: ChannelKind,
    connect: Option<SocketAddrV4>,
}

const USAGE: &str = "usage: smoltcp_service [--channel uds|shm] [--connect IP:PORT] \
<control-socket> <interface> <ip/prefix> <gateway> [echo-port] [http-port] [mac]";

fn usage(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{why}\n{USAGE}"))
}

impl Options {
    /// Parses the arguments (without the program name). Options may stand anywhere.
    fn parse(args: impl IntoIterator<Item = String>) -> io::Result<Options> {
        let mut positional = Vec::new();
        let mut channel = ChannelKind::Uds;
        let mut connect = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |what: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or_else(|| usage(&format!("{what} needs a value")))
            };
            match name.as_str() {
                "--channel" => {
                    channel = match value("--channel")?.as_str() {
                        "uds" => ChannelKind::Uds,
                        "shm" => ChannelKind::Shm,
                        other => return Err(usage(&format!("unknown channel {other:?}"))),
                    }
                }
                "--connect" => {
                    let v = value("--connect")?;
                    connect = Some(
                        v.parse::<SocketAddrV4>()
                            .map_err(|_| usage(&format!("--connect: bad IPv4 IP:PORT {v:?}")))?,
                    );
                }
                "-h" | "--help" => return Err(usage("help")),
                s if s.starts_with("--") => return Err(usage(&format!("unknown option {s}"))),
                _ => positional.push(arg),
            }
        }
        if positional.len() < 4 || positional.len() > 7 {
            return Err(usage("wrong number of arguments"));
        }
        let (ip, prefix) = positional[2]
            .split_once('/')
            .ok_or_else(|| usage("the address needs a /prefix"))?;
        let port = |i: usize, default: u16| -> io::Result<u16> {
            positional
                .get(i)
                .map_or(Ok(default), |p| p.parse())
                .map_err(|_| usage("bad port"))
        };
        Ok(Options {
            control: positional[0].clone(),
            interface: positional[1].clone(),
            ip: ip.parse().map_err(|_| usage("bad IPv4 address"))?,
            prefix: prefix
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| usage("bad prefix"))?,
            gateway: positional[3].parse().map_err(|_| usage("bad gateway"))?,
            echo_port: port(4, 7)?,
            http_port: port(5, 8080)?,
            mac: positional.get(6).map(|m| parse_mac(m)).transpose()?,
            channel,
            connect,
        })
    }
}

/// The control connection; says `DeleteClient` when dropped, so the switch forgets the
/// service at once on a clean exit (and on an error half-way through attaching).
struct Attachment {
    client: Client,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.client.delete_client();
    }
}

/// A fresh path for the service's control socket (its identity towards the switch).
fn own_socket_path() -> PathBuf {
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("usnet-smoltcp-{}", std::process::id()));
    // A leftover of an earlier process with our pid.
    let _ = std::fs::remove_file(&path);
    path
}

/// Attaches a shared-memory channel: `RequestShm`, then maps the rings from the fds (memfd,
/// to-client eventfd, to-switch eventfd).
fn request_shm_channel(client: &Client, interface: &str, pid: i32) -> io::Result<ShmClient> {
    let (info, fds) = client.request_shm(interface, pid)?;
    if info.version != SHM_VERSION {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("shared-memory layout version {} unknown", info.version),
        ));
    }
    let Ok([memfd, to_client, to_switch]) = <[OwnedFd; 3]>::try_from(fds) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "RequestShm: expected 3 fds (memfd and two eventfds)",
        ));
    };
    ShmClient::from_fds(memfd, [to_client, to_switch])
}

/// A listening TCP rule on `ip:port`.
fn listening(ip: Ipv4Addr, port: u16) -> UsnetMatch {
    UsnetMatch {
        dst_addr: WireIp::Ipv4(ip),
        dst_port: Some(port),
        src_addr: None,
        src_port: None,
        protocol: 6,
    }
}

/// The rule for one outgoing TCP connection (the full 5-tuple, as seen from the network).
fn connection(ip: Ipv4Addr, local_port: u16, remote: SocketAddrV4) -> UsnetMatch {
    UsnetMatch {
        dst_addr: WireIp::Ipv4(ip),
        dst_port: Some(local_port),
        src_addr: Some(WireIp::Ipv4(*remote.ip())),
        src_port: Some(remote.port()),
        protocol: 6,
    }
}

/// The ICMP rule for `ip` (echo requests to the service's own address).
fn icmp(ip: Ipv4Addr) -> UsnetMatch {
    UsnetMatch {
        dst_addr: WireIp::Ipv4(ip),
        dst_port: None,
        src_addr: None,
        src_port: None,
        protocol: 1,
    }
}

/// AddMatch that must succeed.
fn add(client: &Client, rule: &UsnetMatch) -> io::Result<()> {
    if client.add_match(rule)? {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "AddMatch {rule:?}: refused by usnetd"
        )))
    }
}

/// The kernel's ephemeral port range (`/proc/sys/net/ipv4/ip_local_port_range`).
fn kernel_ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>());
            match (it.next(), it.next()) {
                (Some(Ok(lo)), Some(Ok(hi))) => Some((lo, hi)),
                _ => None,
            }
        })
        .unwrap_or((32768, 60999))
}

/// Local port candidates for outgoing connections: pseudo-random in 1025-65535 outside the
/// kernel's ephemeral range `(lo, hi)`, as existing clients choose them.
struct PortPicker {
    state: u64,
    range: (u16, u16),
}

impl PortPicker {
    fn new(seed: u64, range: (u16, u16)) -> PortPicker {
        PortPicker {
            state: seed | 1,
            range,
        }
    }

    /// The next candidate; `None` when the ephemeral range covers all of 1025-65535.
    fn next_port(&mut self) -> Option<u16> {
        for _ in 0..10_000 {
            // xorshift64
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            let port = 1025 + (self.state % (65536 - 1025)) as u16;
            if !(self.range.0..=self.range.1).contains(&port) {
                return Some(port);
            }
        }
        None
    }
}

/// Whether the kernel owns `ip` in this network namespace (binding to it works). A service on
/// the kernel's own address must not take its ICMP: the kernel answers pings itself.
fn kernel_owns(ip: Ipv4Addr) -> bool {
    std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Registers the service's rules: both listening ports, ICMP when the address is its own, and
/// the outgoing connection (trying local ports until one is free). Returns the connection's
/// local port.
fn register(
    client: &Client,
    opts: &Options,
    with_icmp: bool,
    ports: &mut PortPicker,
) -> io::Result<Option<u16>> {
    add(client, &listening(opts.ip, opts.echo_port))?;
    add(client, &listening(opts.ip, opts.http_port))?;
    if with_icmp {
        add(client, &icmp(opts.ip))?;
    }
    let Some(remote) = opts.connect else {
        return Ok(None);
    };
    for _ in 0..32 {
        let port = ports
            .next_port()
            .ok_or_else(|| io::Error::other("no local port outside the ephemeral range"))?;
        if client.add_match(&connection(opts.ip, port, remote))? {
            return Ok(Some(port));
        }
    }
    Err(io::Error::other(
        "AddMatch for the outgoing connection refused for 32 local ports",
    ))
}

fn interface_mac(interface: &str) -> io::Result<EthernetAddress> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{interface}/address"))?;
    parse_mac(text.trim())
}

fn parse_mac(s: &str) -> io::Result<EthernetAddress> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad MAC"))?;
    let b: [u8; 6] = bytes
        .try_into()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad MAC"))?;
    Ok(EthernetAddress(b))
}

fn interface_mtu(interface: &str) -> usize {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|m| (576..=9000).contains(m))
        .unwrap_or(1500)
}

/// The longest the service sleeps, so that it notices SIGTERM/SIGINT.
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// Runs the service over `channel` until `stop` is set.
fn serve<C: PacketChannel>(
    channel: C,
    opts: &Options,
    mac: EthernetAddress,
    outgoing: Option<u16>,
    client: &Client,
    stop: &AtomicBool,
) -> io::Result<()> {
    let mut device = ChannelDevice::new(channel, interface_mtu(&opts.interface));
    let mut service = Service::new(
        &mut device,
        mac,
        IpCidr::new(opts.ip.into(), opts.prefix),
        Some(opts.gateway),
        opts.echo_port,
        opts.http_port,
    );
    if let (Some(remote), Some(port)) = (opts.connect, outgoing) {
        service.connect(remote, port);
    }
    println!("ready");
    while !stop.load(Ordering::Relaxed) {
        let delay = service.poll(&mut device);
        if let Some(Outcome { local_port, .. }) = service.take_finished() {
            if let Some(remote) = opts.connect {
                // The connection is closed: give its rule back.
                client.remove_match(&connection(opts.ip, local_port, remote))?;
            }
        }
        device
            .channel
            .wait(Some(delay.map_or(MAX_SLEEP, |d| d.min(MAX_SLEEP))))?;
    }
    println!("stopping");
    Ok(())
}

fn main() -> io::Result<()> {
    let opts = Options::parse(std::env::args().skip(1))?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let mac = match opts.mac {
        Some(m) => m,
        None => interface_mac(&opts.interface)?,
    };
    let pid = std::process::id() as i32;
    let attachment = Attachment {
        client: Client::connect(&opts.control, own_socket_path())?,
    };
    let client = &attachment.client;
    let with_icmp = !kernel_owns(opts.ip);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    let mut ports = PortPicker::new(seed, kernel_ephemeral_range());
    let kind = match opts.channel {
        ChannelKind::Uds => "uds",
        ChannelKind::Shm => "shm",
    };
    let print_serving = || {
        println!(
            "serving echo on {ip}:{} and HTTP on {ip}:{} (MAC {mac}, channel {kind}{})",
            opts.echo_port,
            opts.http_port,
            if with_icmp { ", ICMP" } else { "" },
            ip = opts.ip
        )
    };
    match opts.channel {
        ChannelKind::Uds => {
            let channel = UdsChannel::new(client.request_uds(&opts.interface, pid)?);
            let outgoing = register(client, &opts, with_icmp, &mut ports)?;
            print_serving();
            serve(channel, &opts, mac, outgoing, client, &stop)
        }
        ChannelKind::Shm => {
            let channel = request_shm_channel(client, &opts.interface, pid)?;
            let outgoing = register(client, &opts, with_icmp, &mut ports)?;
            print_serving();
            serve(channel, &opts, mac, outgoing, client, &stop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixDatagram;

    /// A second smoltcp stack acting as the remote peer.
    struct Peer {
        iface: Interface,
        sockets: SocketSet<'static>,
        tcp: SocketHandle,
    }

    impl Peer {
        fn new<C: PacketChannel>(device: &mut ChannelDevice<C>) -> Peer {
            let mac = EthernetAddress([2, 0, 0, 0, 0, 1]);
            let mut iface = Interface::new(Config::new(mac.into()), device, now());
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(Ipv4Address::new(10, 0, 0, 1).into(), 24));
            });
            let mut sockets = SocketSet::new(vec![]);
            let tcp = sockets.add(tcp_socket());
            Peer {
                iface,
                sockets,
                tcp,
            }
        }
    }

    /// Runs both stacks over a socketpair until `done` says so (bounded by a deadline).
    fn exchange(
        service: &mut Service,
        sdev: &mut ChannelDevice<UdsChannel>,
        peer: &mut Peer,
        pdev: &mut ChannelDevice<UdsChannel>,
        mut step: impl FnMut(&mut tcp::Socket<'static>) -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            service.poll(sdev);
            peer.iface.poll(now(), pdev, &mut peer.sockets);
            if step(peer.sockets.get_mut::<tcp::Socket>(peer.tcp)) {
                return true;
            }
            peer.iface.poll(now(), pdev, &mut peer.sockets);
            let _ = pdev.channel.wait(Some(Duration::from_millis(2)));
        }
        false
    }

    fn pair() -> (ChannelDevice<UdsChannel>, ChannelDevice<UdsChannel>) {
        let (a, b) = UnixDatagram::pair().expect("socketpair");
        (
            ChannelDevice::new(UdsChannel::new(OwnedFd::from(a)), 1500),
            ChannelDevice::new(UdsChannel::new(OwnedFd::from(b)), 1500),
        )
    }

    fn setup() -> (
        Service,
        ChannelDevice<UdsChannel>,
        Peer,
        ChannelDevice<UdsChannel>,
    ) {
        let (mut sdev, mut pdev) = pair();
        let service = Service::new(
            &mut sdev,
            EthernetAddress([2, 0, 0, 0, 0, 2]),
            IpCidr::new(Ipv4Address::new(10, 0, 0, 2).into(), 24),
            None,
            7,
            8080,
        );
        let peer = Peer::new(&mut pdev);
        (service, sdev, peer, pdev)
    }

    fn connect(peer: &mut Peer, port: u16, local: u16) {
        let cx = peer.iface.context();
        peer.sockets
            .get_mut::<tcp::Socket>(peer.tcp)
            .connect(cx, (IpAddress::v4(10, 0, 0, 2), port), local)
            .expect("connect");
    }

    #[test]
    fn tcp_echo_over_a_socketpair() {
        let (mut service, mut sdev, mut peer, mut pdev) = setup();
        connect(&mut peer, 7, 40000);
        let message = b"hello through the channel".repeat(200);
        let mut sent = 0;
        let mut echoed = Vec::new();
        let ok = exchange(&mut service, &mut sdev, &mut peer, &mut pdev, |s| {
            if s.may_send() && sent < message.len() {
                sent += s.send_slice(&message[sent..]).unwrap_or(0);
            }
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.recv_slice(&mut buf) {
                echoed.extend_from_slice(&buf[..n]);
            }
            echoed.len() >= message.len()
        });
        assert!(ok, "echo timed out after {} bytes", echoed.len());
        assert_eq!(echoed, message);
    }

    #[test]
    fn http_get_over_a_socketpair() {
        let (mut service, mut sdev, mut peer, mut pdev) = setup();
        connect(&mut peer, 8080, 40001);
        let mut asked = false;
        let mut response = Vec::new();
        let ok = exchange(&mut service, &mut sdev, &mut peer, &mut pdev, |s| {
            if s.may_send() && !asked {
                s.send_slice(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                    .expect("send");
                asked = true;
            }
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = s.recv_slice(&mut buf) {
                response.extend_from_slice(&buf[..n]);
            }
            // The server closes after answering.
            asked && !s.may_recv() && s.state() != tcp::State::SynSent
        });
        assert!(ok, "HTTP timed out");
        let text = String::from_utf8(response).expect("utf-8");
        assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "{text}");
        assert!(text.ends_with(&format!("\r\n\r\n{HTTP_BODY}")), "{text}");
    }

    #[test]
    fn http_answers_404_elsewhere() {
        assert!(http_response(b"GET /x HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        assert!(http_response(b"\r\n\r\n").starts_with("HTTP/1.0 404"));
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:00:0a:0b:0c:ff").unwrap(),
            EthernetAddress([2, 0, 10, 11, 12, 255])
        );
        assert!(parse_mac("02:00").is_err());
        assert!(parse_mac("02:00:0a:0b:0c:zz").is_err());
    }

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_keep_the_positional_form_and_add_channel_and_connect() {
        let o = Options::parse(args("/run/usnetd.socket eth0 10.0.0.2/24 10.0.0.1")).unwrap();
        assert_eq!(
            o,
            Options {
                control: "/run/usnetd.socket".into(),
                interface: "eth0".into(),
                ip: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                gateway: Ipv4Addr::new(10, 0, 0, 1),
                echo_port: 7,
                http_port: 8080,
                mac: None,
                channel: ChannelKind::Uds,
                connect: None,
            }
        );
        let o = Options::parse(args(
            "--channel shm c eth0 10.0.0.5/16 10.0.0.1 9 8090 02:00:00:00:00:05 --connect=10.0.0.1:7",
        ))
        .unwrap();
        assert_eq!(o.channel, ChannelKind::Shm);
        assert_eq!(o.connect, Some("10.0.0.1:7".parse().unwrap()));
        assert_eq!((o.prefix, o.echo_port, o.http_port), (16, 9, 8090));
        assert_eq!(o.mac, Some(EthernetAddress([2, 0, 0, 0, 0, 5])));
        for bad in [
            "c eth0 10.0.0.2/24",
            "c eth0 10.0.0.2 10.0.0.1",
            "c eth0 10.0.0.2/33 10.0.0.1",
            "--channel netmap c eth0 10.0.0.2/24 10.0.0.1",
            "--connect 10.0.0.1 c eth0 10.0.0.2/24 10.0.0.1",
            "--connect",
            "--bogus c eth0 10.0.0.2/24 10.0.0.1",
            "c eth0 10.0.0.2/24 10.0.0.1 70000",
        ] {
            assert!(Options::parse(args(bad)).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn local_ports_avoid_the_ephemeral_range() {
        let mut p = PortPicker::new(42, (32768, 60999));
        let ports: Vec<u16> = (0..2000).map(|_| p.next_port().unwrap()).collect();
        assert!(ports
            .iter()
            .all(|&x| x >= 1025 && !(32768..=60999).contains(&x)));
        // Both sides of the range are used.
        assert!(ports.iter().any(|&x| x < 32768) && ports.iter().any(|&x| x > 60999));
        assert_eq!(PortPicker::new(1, (1, 65535)).next_port(), None);
    }

    /// The service's outgoing connection against a peer stack that answers one line.
    #[test]
    fn outgoing_connection_prints_the_answer() {
        let (mut service, mut sdev, mut peer, mut pdev) = setup();
        peer.sockets
            .get_mut::<tcp::Socket>(peer.tcp)
            .listen(7000)
            .unwrap();
        service.connect("10.0.0.1:7000".parse().unwrap(), 2000);
        let mut heard = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut finished = None;
        while finished.is_none() && std::time::Instant::now() < deadline {
            service.poll(&mut sdev);
            peer.iface.poll(now(), &mut pdev, &mut peer.sockets);
            let s = peer.sockets.get_mut::<tcp::Socket>(peer.tcp);
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = s.recv_slice(&mut buf) {
                heard.extend_from_slice(&buf[..n]);
                if heard.ends_with(b"\n") {
                    // Answer and close first, so the service's side skips TIME-WAIT.
                    s.send_slice(b"pong\n").unwrap();
                    s.close();
                }
            }
            peer.iface.poll(now(), &mut pdev, &mut peer.sockets);
            finished = service.take_finished();
            let _ = pdev.channel.wait(Some(Duration::from_millis(2)));
        }
        assert_eq!(heard, CONNECT_LINE);
        assert_eq!(
            finished,
            Some(Outcome {
                local_port: 2000,
                reply: Some("pong".into())
            })
        );
        assert_eq!(service.take_finished(), None, "reported twice");
    }

    /// The attach sequence, byte for byte, against a fake switch: RequestUDS, AddMatch for both
    /// ports, ICMP, the connection (retried with another port after ER), DeleteClient on drop.
    #[test]
    fn attach_speaks_the_raw_protocol() {
        let dir = std::env::temp_dir().join(format!("smoltcp-ctl-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let ctl_path = dir.join("ctl");
        let _ = std::fs::remove_file(&ctl_path);
        let switch = UnixDatagram::bind(&ctl_path).expect("bind");
        switch
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let fake = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut requests = Vec::new();
            let mut refused_one = false;
            while let Ok((n, from)) = switch.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let to = from.as_pathname().expect("client bound").to_path_buf();
                requests.push(text.clone());
                if text.starts_with("{\"RequestUDS\"") {
                    let (a, _b) = UnixDatagram::pair().unwrap();
                    usnetd_client::send_with_fds(&switch, &to, b"$", &[a.as_raw_fd()]).unwrap();
                } else if text.contains("\"src_addr\":{") && !refused_one {
                    refused_one = true;
                    switch.send_to(b"ER", &to).unwrap();
                } else if text.starts_with("{\"AddMatch\"") {
                    switch.send_to(b"OK", &to).unwrap();
                } else {
                    break;
                }
            }
            requests
        });
        let opts = Options::parse(args(
            "--connect 10.0.0.1:443 ctl eth0 10.0.0.2/24 10.0.0.1 7 8080",
        ))
        .unwrap();
        let range = (32768, 60999);
        let mut expected_ports = PortPicker::new(7, range);
        let (first, second) = (
            expected_ports.next_port().unwrap(),
            expected_ports.next_port().unwrap(),
        );
        let attachment = Attachment {
            client: Client::connect(&ctl_path, dir.join("client")).expect("connect"),
        };
        let fd = attachment
            .client
            .request_uds("eth0", std::process::id() as i32)
            .expect("RequestUDS");
        assert!(fd.as_raw_fd() >= 0);
        let port = register(
            &attachment.client,
            &opts,
            true,
            &mut PortPicker::new(7, range),
        )
        .expect("register");
        assert_eq!(port, Some(second));
        drop(attachment);
        let requests = fake.join().unwrap();
        let rule = |port: u16, src: &str, proto: u8| {
            format!("{{\"AddMatch\":{{\"dst_addr\":{{\"Ipv4\":\"10.0.0.2\"}},\"dst_port\":{port},\"src_addr\":{src},\"src_port\":{},\"protocol\":{proto}}}}}",
                if src == "null" { "null" } else { "443" })
        };
        let expected = vec![
            format!("{{\"RequestUDS\":[\"eth0\",{}]}}", std::process::id()),
            rule(7, "null", 6),
            rule(8080, "null", 6),
            "{\"AddMatch\":{\"dst_addr\":{\"Ipv4\":\"10.0.0.2\"},\"dst_port\":null,\"src_addr\":null,\"src_port\":null,\"protocol\":1}}".to_string(),
            rule(first, "{\"Ipv4\":\"10.0.0.1\"}", 6),
            rule(second, "{\"Ipv4\":\"10.0.0.1\"}", 6),
            "\"DeleteClient\"".to_string(),
        ];
        assert_eq!(requests, expected);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
