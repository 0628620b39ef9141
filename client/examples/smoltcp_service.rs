//! A smoltcp service behind usnetd: a TCP echo port and a tiny HTTP server answering `GET /`
//! with a fixed body, on its own IP (and MAC), attached to the switch's control socket.
//!
//! ```text
//! smoltcp_service <control-socket> <interface> <ip/prefix> <gateway> [echo-port] [http-port] [mac]
//! smoltcp_service /run/usnetd.socket eth0 10.0.0.2/24 10.0.0.1 7 8080
//! ```
//!
//! Without `mac`, the interface's MAC is used (the "Passthru" mode of existing clients).
//!
//! It sends `RequestUDS` to get its packet channel (a Unix datagram socket, one Ethernet frame
//! per datagram), then `AddMatch` for each listening port, and runs smoltcp over the channel
//! through a `phy::Device` built on [`PacketChannel`]. The control part here is a minimal local
//! helper speaking the raw JSON of PROTOCOL.md, independent of the client library.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use usnetd_client::channel::{PacketChannel, UdsChannel};

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
        }
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

/// A minimal control-socket client: raw JSON requests from a bound Unix datagram socket.
struct Control {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Control {
    fn connect(control_path: &str) -> io::Result<Control> {
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let path = dir.join(format!("usnet-smoltcp-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let socket = UnixDatagram::bind(&path)?;
        socket.connect(control_path)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Control { socket, path })
    }

    fn request(&self, json: &str) -> io::Result<Vec<u8>> {
        self.socket.send(json.as_bytes())?;
        let mut buf = vec![0u8; 65536];
        let n = self.socket.recv(&mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// `RequestUDS`: the answer is `$` with the channel's fd, or `ER`.
    fn request_uds(&self, interface: &str) -> io::Result<OwnedFd> {
        let json = format!(
            "{{\"RequestUDS\":[{},{}]}}",
            json_string(interface),
            std::process::id()
        );
        self.socket.send(json.as_bytes())?;
        recv_fd(&self.socket)
    }

    /// `AddMatch` for a listening TCP port.
    fn add_listen(&self, ip: Ipv4Addr, port: u16) -> io::Result<()> {
        let json = format!(
            "{{\"AddMatch\":{{\"dst_addr\":{{\"Ipv4\":\"{ip}\"}},\"dst_port\":{port},\"src_addr\":null,\"src_port\":null,\"protocol\":6}}}}"
        );
        match self.request(&json)?.as_slice() {
            b"OK" => Ok(()),
            other => Err(io::Error::other(format!(
                "AddMatch {ip}:{port}: {}",
                String::from_utf8_lossy(other)
            ))),
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.socket.send(b"\"DeleteClient\"");
        let _ = std::fs::remove_file(&self.path);
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Receives one datagram carrying an fd by SCM_RIGHTS (the `RequestUDS` answer).
fn recv_fd(socket: &UnixDatagram) -> io::Result<OwnedFd> {
    let mut data = [0u8; 64];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cmsg = [0u64; 16];
    // SAFETY: msghdr is a plain C struct; all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cmsg);
    // SAFETY: the buffers msg points at live on this stack frame for the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into `cmsg`, within
    // msg_controllen, with the libc CMSG macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let p = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let raw = p.add(i).read_unaligned();
                    // We own every fd the kernel passed; keep the first, close the rest.
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    match (fd, &data[..n as usize]) {
        (Some(fd), b"$") => Ok(fd),
        (_, answer) => Err(io::Error::other(format!(
            "RequestUDS refused: {:?}",
            String::from_utf8_lossy(answer)
        ))),
    }
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

fn usage() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "usage: smoltcp_service <control-socket> <interface> <ip/prefix> <gateway> [echo-port] [http-port] [mac]",
    )
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        return Err(usage());
    }
    let (control_path, interface) = (&args[0], &args[1]);
    let (ip, prefix) = args[2].split_once('/').ok_or_else(usage)?;
    let ip: Ipv4Addr = ip.parse().map_err(|_| usage())?;
    let prefix: u8 = prefix.parse().map_err(|_| usage())?;
    let gateway: Ipv4Addr = args[3].parse().map_err(|_| usage())?;
    let echo_port: u16 = args
        .get(4)
        .map_or(Ok(7), |p| p.parse())
        .map_err(|_| usage())?;
    let http_port: u16 = args
        .get(5)
        .map_or(Ok(8080), |p| p.parse())
        .map_err(|_| usage())?;
    let mac = match args.get(6) {
        Some(m) => parse_mac(m)?,
        None => interface_mac(interface)?,
    };

    let control = Control::connect(control_path)?;
    let fd = control.request_uds(interface)?;
    control.add_listen(ip, echo_port)?;
    control.add_listen(ip, http_port)?;
    println!("serving echo on {ip}:{echo_port} and HTTP on {ip}:{http_port} (MAC {mac})");

    let mut device = ChannelDevice::new(UdsChannel::new(fd), 1500);
    let mut service = Service::new(
        &mut device,
        mac,
        IpCidr::new(ip.into(), prefix),
        Some(gateway),
        echo_port,
        http_port,
    );
    loop {
        let delay = service.poll(&mut device);
        device.channel.wait(delay)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::IpAddress;

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
    fn macs_and_json_strings() {
        assert_eq!(
            parse_mac("02:00:0a:0b:0c:ff").unwrap(),
            EthernetAddress([2, 0, 10, 11, 12, 255])
        );
        assert!(parse_mac("02:00").is_err());
        assert_eq!(json_string("eth\"0"), "\"eth\\\"0\"");
    }

    #[test]
    fn attach_speaks_the_raw_protocol() {
        // A fake switch: answers RequestUDS with `$` + an fd, and AddMatch with OK.
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
            for _ in 0..2 {
                let (n, from) = switch.recv_from(&mut buf).expect("request");
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                let to = from.as_pathname().expect("client bound").to_path_buf();
                if text.starts_with("{\"RequestUDS\"") {
                    let (a, _b) = UnixDatagram::pair().unwrap();
                    send_fd(&switch, &to, a.as_raw_fd());
                } else {
                    switch.send_to(b"OK", &to).unwrap();
                }
                requests.push(text);
            }
            requests
        });
        let control = Control::connect(ctl_path.to_str().unwrap()).expect("connect");
        let fd = control.request_uds("eth0").expect("RequestUDS");
        assert!(fd.as_raw_fd() >= 0);
        control
            .add_listen(Ipv4Addr::new(10, 0, 0, 2), 8080)
            .expect("AddMatch");
        let requests = fake.join().unwrap();
        assert_eq!(
            requests[0],
            format!("{{\"RequestUDS\":[\"eth0\",{}]}}", std::process::id())
        );
        assert_eq!(
            requests[1],
            "{\"AddMatch\":{\"dst_addr\":{\"Ipv4\":\"10.0.0.2\"},\"dst_port\":8080,\"src_addr\":null,\"src_port\":null,\"protocol\":6}}"
        );
        drop(control);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn send_fd(socket: &UnixDatagram, to: &std::path::Path, fd: libc::c_int) {
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: sockaddr_un and msghdr are plain C structs; all-zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(to.as_os_str().as_bytes()) {
            *d = *s as libc::c_char;
        }
        let mut data = *b"$";
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut cmsg = [0u64; 8];
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_un).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG macros over our own control buffer, sized for one fd.
        unsafe {
            msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            libc::CMSG_DATA(c).cast::<libc::c_int>().write_unaligned(fd);
            assert_eq!(libc::sendmsg(socket.as_raw_fd(), &msg, 0), 1);
        }
    }
}
