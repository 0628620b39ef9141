//! `usnetd-bench sink`: counts the generator's frames.
//!
//! Three ways to receive:
//! - `--iface IF`: AF_PACKET TPACKET_V3 rings ([`PacketBackend`] with the kernel left on the
//!   NIC), the "direct" sink on the switch's host without a switch; with `--io xdp` AF_XDP
//!   sockets on every queue of IF instead ([`XdpBackend`]: the daemon's own XDP program, which
//!   redirects every frame to its queue's socket, so the kernel sees none while it runs);
//! - `--udp ADDR:PORT`: a kernel UDP socket (`recvmmsg`), for the kernel's side;
//! - `--usnetd CTL --channel uds|shm`: a usnetd client that asks for a packet channel and a
//!   listening rule (`--ip`, `--port`, `--proto`), counting what the switch delivers.
//!
//! Only frames (datagrams) that carry the generator's signature are counted as frames; others
//! are counted apart. Prints the rate every second and a summary (rate between the first and
//! the last counted frame, one-way delay percentiles from the frames' timestamps) at the end.
//! Stops after `--seconds`, after `--count` frames, after `--idle-exit` seconds without frames
//! (once frames came), or on SIGINT/SIGTERM.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};
use hdrhistogram::Histogram;
use usnetd::backend::packet::PacketBackend;
use usnetd::backend::xdp::{XdpBackend, XdpConfig};
use usnetd::backend::Backend;
use usnetd_client::protocol::UsnetMatch;
use usnetd_client::shm::ShmClient;
use usnetd_client::Client;
use usnetd_shards::port::FrameBatch;

use crate::probe;
use crate::report::{Percentiles, Summary, Ticker};

/// Packet channel kinds a client sink can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ChannelKind {
    /// Unix datagram socket pair.
    Uds,
    /// Shared-memory rings.
    Shm,
}

/// How `--iface` receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SinkIo {
    /// AF_PACKET TPACKET_V3 rings (a fanout group of `--queues` sockets).
    Packet,
    /// AF_XDP sockets, one per NIC receive queue, behind an XDP redirect program.
    Xdp,
}

/// Transport protocols of the client rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Proto {
    /// UDP (17).
    Udp,
    /// TCP (6).
    Tcp,
}

/// Options of `sink`.
#[derive(ClapArgs, Debug, Clone)]
pub struct Args {
    /// Receive with AF_PACKET on this interface.
    #[arg(long, conflicts_with_all = ["udp", "usnetd"])]
    pub iface: Option<String>,
    /// Packet sockets in the fanout group for --iface (`--io packet`).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// How --iface receives: AF_PACKET rings or AF_XDP sockets.
    #[arg(long, value_enum, default_value_t = SinkIo::Packet)]
    pub io: SinkIo,
    /// Receive on a kernel UDP socket bound to this address.
    #[arg(long, conflicts_with = "usnetd")]
    pub udp: Option<SocketAddr>,
    /// Attach to usnetd at this control socket as a client.
    #[arg(long)]
    pub usnetd: Option<PathBuf>,
    /// The client's channel kind.
    #[arg(long, value_enum, default_value_t = ChannelKind::Uds)]
    pub channel: ChannelKind,
    /// Interface the client's channel is on.
    #[arg(long, default_value = "sw0")]
    pub usnetd_iface: String,
    /// The client rule's local IP.
    #[arg(long, default_value = "10.77.0.2")]
    pub ip: IpAddr,
    /// The client rule's local port.
    #[arg(long, default_value_t = 9001)]
    pub port: u16,
    /// The client rule's protocol.
    #[arg(long, value_enum, default_value_t = Proto::Udp)]
    pub proto: Proto,
    /// Network namespace to enter first (for --iface and --udp).
    #[arg(long)]
    pub netns: Option<String>,
    /// Longest run time in seconds (0: until a signal, --count or --idle-exit).
    #[arg(long, default_value_t = 0.0)]
    pub seconds: f64,
    /// Stop after this many counted frames (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Stop after this many seconds without counted frames, once one came (0: never).
    #[arg(long, default_value_t = 0.0)]
    pub idle_exit: f64,
    /// Create this file once the sink is ready to receive.
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// No per-second lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Counting state shared by all receive modes.
struct Counter {
    matched: u64,
    bytes: u64,
    other: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    owd: Histogram<u64>,
    batch_time_ns: u64,
}

impl Counter {
    fn new() -> Counter {
        Counter {
            matched: 0,
            bytes: 0,
            other: 0,
            first: None,
            last: None,
            owd: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
            batch_time_ns: 0,
        }
    }

    /// Starts a batch: one clock read for all its frames.
    fn begin_batch(&mut self) {
        self.batch_time_ns = probe::now_ns();
    }

    fn count(&mut self, probe: Option<probe::Probe>, bytes: usize) {
        match probe {
            Some(p) => {
                self.matched += 1;
                self.bytes += bytes as u64;
                let _ = self
                    .owd
                    .record(self.batch_time_ns.saturating_sub(p.time_ns).max(1));
            }
            None => self.other += 1,
        }
    }

    /// Ends a batch that counted `before` frames before it started.
    fn end_batch(&mut self, before: u64) {
        if self.matched > before {
            let now = Instant::now();
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
    }
}

/// A receive mode: fills the counter with what is ready, or waits a little when nothing is.
trait Receiver {
    fn name(&self) -> &'static str;
    /// Receives what is ready; returns the frames seen (counted or not).
    fn poll(&mut self, counter: &mut Counter) -> io::Result<usize>;
    /// Sleeps until something may be ready (at most `timeout`).
    fn wait(&mut self, timeout: Duration) -> io::Result<()>;
}

/// Receive queues of a backend (AF_PACKET rings or AF_XDP sockets).
struct PacketReceiver {
    rx: Vec<Box<dyn usnetd_shards::port::RxQueue>>,
    name: &'static str,
}

impl Receiver for PacketReceiver {
    fn name(&self) -> &'static str {
        self.name
    }
    fn poll(&mut self, counter: &mut Counter) -> io::Result<usize> {
        let mut total = 0;
        for q in &mut self.rx {
            let mut batch = FrameBatch::new();
            let n = q.recv(&mut batch);
            for f in batch.as_slice() {
                counter.count(probe::parse_frame(f), f.len());
            }
            total += n;
        }
        Ok(total)
    }
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        // Rings hand over blocks at most every block timeout (1 ms); a short nap costs
        // nothing in throughput and keeps this thread off the switch's cores.
        std::thread::sleep(timeout.min(Duration::from_micros(200)));
        Ok(())
    }
}

/// A datagram socket read with `recvmmsg` (kernel UDP socket or the UDS channel).
struct DatagramReceiver {
    fd: RawFd,
    _owner: DatagramOwner,
    /// Whether datagrams are whole Ethernet frames (UDS channel) or UDP payloads.
    frames: bool,
    /// Header bytes added to a UDP payload's length to count frame bytes.
    header_bytes: usize,
    bufs: Vec<[u8; 2048]>,
}

#[allow(dead_code)]
enum DatagramOwner {
    Udp(UdpSocket),
    Fd(OwnedFd),
}

impl Receiver for DatagramReceiver {
    fn name(&self) -> &'static str {
        if self.frames {
            "uds"
        } else {
            "udp"
        }
    }
    fn poll(&mut self, counter: &mut Counter) -> io::Result<usize> {
        const N: usize = 64;
        // SAFETY: iovec/mmsghdr are plain C structs; all-zero is valid.
        let mut iov: [libc::iovec; N] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; N] = unsafe { std::mem::zeroed() };
        for (i, b) in self.bufs.iter_mut().enumerate().take(N) {
            iov[i].iov_base = b.as_mut_ptr().cast();
            iov[i].iov_len = b.len();
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: msgs point to iovs that point to our buffers, all alive during the call.
        let n = unsafe {
            libc::recvmmsg(
                self.fd,
                msgs.as_mut_ptr(),
                N as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        for (msg, buf) in msgs.iter().zip(&self.bufs).take(n as usize) {
            let len = (msg.msg_len as usize).min(2048);
            let data = &buf[..len];
            let p = if self.frames {
                probe::parse_frame(data)
            } else {
                probe::parse_payload(data)
            };
            counter.count(p, len + self.header_bytes);
        }
        Ok(n as usize)
    }
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, timeout.as_millis().max(1) as i32) };
        Ok(())
    }
}

struct ShmReceiver {
    shm: ShmClient,
}

impl Receiver for ShmReceiver {
    fn name(&self) -> &'static str {
        "shm"
    }
    fn poll(&mut self, counter: &mut Counter) -> io::Result<usize> {
        Ok(self
            .shm
            .recv_batch(|f| counter.count(probe::parse_frame(f), f.len())))
    }
    fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.shm.wait(Some(timeout)).map(drop)
    }
}

fn set_rcvbuf(fd: RawFd, bytes: libc::c_int) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a c_int value of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

/// The client side of a usnetd attachment; says goodbye on drop.
struct Attachment {
    client: Client,
    path: PathBuf,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.client.delete_client();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn attach(args: &Args, ctl: &PathBuf) -> Result<(Attachment, Box<dyn Receiver>), String> {
    let path = std::env::temp_dir().join(format!("usnetd-bench-sink-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let client =
        Client::connect(ctl, &path).map_err(|e| format!("connecting to {}: {e}", ctl.display()))?;
    let attachment = Attachment { client, path };
    let pid = std::process::id() as i32;
    let receiver: Box<dyn Receiver> = match args.channel {
        ChannelKind::Uds => {
            let fd = attachment
                .client
                .request_uds(&args.usnetd_iface, pid)
                .map_err(|e| format!("RequestUDS: {e}"))?;
            set_rcvbuf(fd.as_raw_fd(), 8 << 20);
            Box::new(DatagramReceiver {
                fd: fd.as_raw_fd(),
                _owner: DatagramOwner::Fd(fd),
                frames: true,
                header_bytes: 0,
                bufs: vec![[0u8; 2048]; 64],
            })
        }
        ChannelKind::Shm => {
            let (_info, fds) = attachment
                .client
                .request_shm(&args.usnetd_iface, pid)
                .map_err(|e| format!("RequestShm: {e}"))?;
            let mut fds = fds.into_iter();
            let (Some(mem), Some(e0), Some(e1)) = (fds.next(), fds.next(), fds.next()) else {
                return Err("RequestShm: fewer than 3 fds".into());
            };
            let shm =
                ShmClient::from_fds(mem, [e0, e1]).map_err(|e| format!("shm channel: {e}"))?;
            Box::new(ShmReceiver { shm })
        }
    };
    let rule = UsnetMatch {
        dst_addr: args.ip.into(),
        dst_port: Some(args.port),
        src_addr: None,
        src_port: None,
        protocol: match args.proto {
            Proto::Udp => 17,
            Proto::Tcp => 6,
        },
    };
    match attachment.client.add_match(&rule) {
        Ok(true) => {}
        Ok(false) => return Err(format!("AddMatch {rule:?} refused")),
        Err(e) => return Err(format!("AddMatch: {e}")),
    }
    Ok((attachment, receiver))
}

/// Runs the sink.
pub fn run(args: &Args) -> Result<(), String> {
    if let Some(ns) = &args.netns {
        crate::netns::enter(ns).map_err(|e| format!("entering netns: {e}"))?;
    }
    let mut _attachment = None;
    let mut receiver: Box<dyn Receiver> = if let Some(ifname) = &args.iface {
        let ports = match args.io {
            SinkIo::Packet => PacketBackend {
                rx_sockets: args.queues.max(1),
                block_kernel: false,
                ..PacketBackend::default()
            }
            .open(ifname, 0),
            SinkIo::Xdp => XdpBackend::new(XdpConfig {
                tx_ring_size: 64,
                ..XdpConfig::default()
            })
            .open(ifname, 0),
        }
        .map_err(|e| format!("opening {ifname}: {e}"))?;
        Box::new(PacketReceiver {
            rx: ports.rx,
            name: match args.io {
                SinkIo::Packet => "packet",
                SinkIo::Xdp => "xdp",
            },
        })
    } else if let Some(addr) = args.udp {
        let socket = UdpSocket::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
        set_rcvbuf(socket.as_raw_fd(), 8 << 20);
        Box::new(DatagramReceiver {
            fd: socket.as_raw_fd(),
            header_bytes: if addr.is_ipv6() { 62 } else { 42 },
            _owner: DatagramOwner::Udp(socket),
            frames: false,
            bufs: vec![[0u8; 2048]; 64],
        })
    } else if let Some(ctl) = &args.usnetd {
        let (a, r) = attach(args, ctl)?;
        _attachment = Some(a);
        r
    } else {
        return Err("one of --iface, --udp or --usnetd is needed".into());
    };
    let stop = crate::signals::stop_flag();
    if let Some(f) = &args.ready_file {
        std::fs::write(f, b"ready\n").map_err(|e| format!("{}: {e}", f.display()))?;
    }
    eprintln!("sink ready ({})", receiver.name());
    let start = Instant::now();
    let mut counter = Counter::new();
    let mut ticker = Ticker::new(format!("sink {}", receiver.name()), args.quiet);
    let mut last_frame = Instant::now();
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        if args.count > 0 && counter.matched >= args.count {
            break;
        }
        let now = Instant::now();
        if args.seconds > 0.0 && now.duration_since(start).as_secs_f64() >= args.seconds {
            break;
        }
        if args.idle_exit > 0.0
            && counter.matched > 0
            && now.duration_since(last_frame).as_secs_f64() >= args.idle_exit
        {
            break;
        }
        let before = counter.matched;
        counter.begin_batch();
        let n = receiver
            .poll(&mut counter)
            .map_err(|e| format!("receive: {e}"))?;
        counter.end_batch(before);
        if counter.matched > before {
            last_frame = now;
        }
        if n == 0 {
            receiver
                .wait(Duration::from_millis(50))
                .map_err(|e| format!("wait: {e}"))?;
        }
        ticker.tick(counter.matched, counter.bytes);
    }
    let seconds = match (counter.first, counter.last) {
        (Some(a), Some(b)) if b > a => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    let mut summary = Summary {
        role: "sink".into(),
        mode: receiver.name().into(),
        frames: counter.matched,
        bytes: counter.bytes,
        other_frames: counter.other,
        seconds,
        owd_us: (counter.matched > 0).then(|| Percentiles::from_ns(&counter.owd)),
        ..Summary::default()
    };
    summary.finish();
    summary.print(args.json);
    Ok(())
}
