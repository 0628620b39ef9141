//! The control server: client registry, request handling, rule validation, dead clients.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::UnixAddr;

use usnetd_client::protocol::{
    ControlAnswer, ControlMessage, UsedPorts, UsnetMatch, WireIp, ANSWER_ERR, ANSWER_FD, ANSWER_OK,
    MAX_REQUEST_LEN,
};
use usnetd_shards::endpoint::{EndpointId, EndpointKind};
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::snapshot::Origin;
use usnetd_shards::table::{RuleError, Table};

use super::liveness::Watch;
use super::socket::{recv_request, send_answer, Received, Sender};
use super::{
    ChannelFactory, ChannelHandover, ClientLimits, KernelPorts, NicControl, SourceAssigner,
};

/// Requests handled per [`ControlServer::poll_once`] at most, so dead-client checks still run
/// under a flood.
const MAX_REQUESTS_PER_POLL: usize = 256;

/// How often `/proc/PID` is checked for clients without pidfd.
const PROC_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Upper bound of one QueryUsedPorts entry's JSON length (`[136,{"Ipv6":"<39>"},65535],`).
const MAX_PORT_ENTRY_LEN: usize = 64;

/// One packet channel of a client, with its endpoint.
struct ClientChannel {
    nic: usize,
    endpoint: EndpointId,
    watches: Vec<Watch>,
    hangup: Option<std::os::fd::OwnedFd>,
    /// Dropped when the channel goes.
    _keep: Option<Box<dyn std::any::Any + Send>>,
}

/// A client: everything registered under one socket path.
struct Client {
    /// Its channels; rules go to the first one's endpoint.
    channels: Vec<ClientChannel>,
    /// Rules it added with AddMatch (on the first channel's NIC).
    rules: BTreeSet<FlowKey>,
}

/// What kind of channel a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelKind {
    Uds,
    Shm,
    NetmapPipe,
}

/// Why a client was removed (for logs).
#[derive(Clone, Copy, Debug)]
enum Removal {
    Deleted,
    ProcessExited,
    HungUp,
}

/// The control socket server. Single-threaded: the daemon's control thread calls
/// [`ControlServer::poll_once`] in a loop.
pub struct ControlServer {
    socket: UnixDatagram,
    nics: Vec<NicControl>,
    channels: Box<dyn ChannelFactory>,
    sources: Box<dyn SourceAssigner>,
    kernel: Box<dyn KernelPorts>,
    limits: ClientLimits,
    clients: HashMap<PathBuf, Client>,
    buf: Vec<u8>,
    last_proc_check: Instant,
}

impl ControlServer {
    /// A server answering on `socket` (from [`super::bind_control_socket`]) for `nics`.
    pub fn new(
        socket: UnixDatagram,
        nics: Vec<NicControl>,
        channels: Box<dyn ChannelFactory>,
        sources: Box<dyn SourceAssigner>,
        kernel: Box<dyn KernelPorts>,
        limits: ClientLimits,
    ) -> io::Result<ControlServer> {
        socket.set_nonblocking(true)?;
        Ok(ControlServer {
            socket,
            nics,
            channels,
            sources,
            kernel,
            limits,
            clients: HashMap::new(),
            buf: vec![0; MAX_REQUEST_LEN],
            last_proc_check: Instant::now(),
        })
    }

    /// Number of attached clients.
    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Waits up to `timeout` (capped at one second while some client is watched through
    /// `/proc`) for requests and dead clients, and handles them. Returns the number of
    /// requests handled plus clients removed.
    pub fn poll_once(&mut self, timeout: Duration) -> io::Result<usize> {
        let mut timeout = timeout.min(Duration::from_secs(60));
        let uses_proc = self
            .clients
            .values()
            .flat_map(|c| &c.channels)
            .flat_map(|ch| &ch.watches)
            .any(|w| matches!(w, Watch::Proc(_)));
        if uses_proc {
            timeout = timeout.min(PROC_CHECK_INTERVAL);
        }
        let (control_ready, mut dead) = {
            let mut fds = vec![PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
            let mut owners: Vec<&PathBuf> = vec![];
            for (path, client) in &self.clients {
                for ch in &client.channels {
                    for w in &ch.watches {
                        if let Watch::Pidfd(fd) = w {
                            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                            owners.push(path);
                        }
                    }
                    if let Some(fd) = &ch.hangup {
                        fds.push(PollFd::new(fd.as_fd(), PollFlags::empty()));
                        owners.push(path);
                    }
                }
            }
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => return Ok(0),
                Err(e) => return Err(e.into()),
            }
            let ready = |p: &PollFd<'_>| p.revents().is_some_and(|r| !r.is_empty());
            let control_ready = ready(&fds[0]);
            let mut dead = vec![];
            for (pfd, path) in fds[1..].iter().zip(owners) {
                if ready(pfd) {
                    let hup = pfd.revents().is_some_and(|r| {
                        r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL)
                    });
                    let why = if hup && !pfd.revents().unwrap().contains(PollFlags::POLLIN) {
                        Removal::HungUp
                    } else {
                        Removal::ProcessExited
                    };
                    dead.push((path.clone(), why));
                }
            }
            (control_ready, dead)
        };
        if uses_proc && self.last_proc_check.elapsed() >= PROC_CHECK_INTERVAL {
            self.last_proc_check = Instant::now();
            for (path, client) in &self.clients {
                if client
                    .channels
                    .iter()
                    .flat_map(|ch| &ch.watches)
                    .any(Watch::proc_gone)
                {
                    dead.push((path.clone(), Removal::ProcessExited));
                }
            }
        }
        let mut handled = 0;
        for (path, why) in dead {
            if self.remove_client(&path, why) {
                handled += 1;
            }
        }
        if control_ready {
            handled += self.handle_pending()?;
        }
        Ok(handled)
    }

    /// Handles queued requests until none is left (or a bound per call).
    fn handle_pending(&mut self) -> io::Result<usize> {
        let mut n = 0;
        while n < MAX_REQUESTS_PER_POLL {
            let mut buf = std::mem::take(&mut self.buf);
            let received = recv_request(&self.socket, &mut buf);
            let result = match received {
                Ok(r) => {
                    self.handle_datagram(&buf, r);
                    Ok(true)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
                Err(e) => {
                    // A receive error must never stop the daemon: log and try later.
                    log::warn!("control socket: receive failed: {e}");
                    Ok(false)
                }
            };
            self.buf = buf;
            match result {
                Ok(true) => n += 1,
                Ok(false) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Decodes and handles one datagram.
    fn handle_datagram(&mut self, buf: &[u8], r: Received) {
        let Some(addr) = r.sender.addr else {
            log::warn!(
                "control socket: request from an unbound socket ignored (no answer possible)"
            );
            return;
        };
        if r.truncated {
            log::warn!("control socket: request larger than {MAX_REQUEST_LEN} bytes: ER");
            self.answer(&addr, ANSWER_ERR, &[]);
            return;
        }
        let bytes = &buf[..r.len];
        let msg = match serde_json::from_slice::<ControlMessage>(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                let variant = top_level_variant(bytes);
                log::warn!(
                    "control socket: undecodable request ({e}), variant {:?}",
                    variant.as_deref()
                );
                if variant.is_none_or(|v| ControlMessage::variant_has_answer(&v)) {
                    self.answer(&addr, ANSWER_ERR, &[]);
                }
                return;
            }
        };
        let Some(path) = addr.path().map(|p| p.to_path_buf()) else {
            log::warn!(
                "control socket: {msg:?} from an abstract address: cannot be tied to a client"
            );
            if msg.has_answer() {
                self.answer(&addr, ANSWER_ERR, &[]);
            }
            return;
        };
        log::debug!("control socket: {msg:?} from {}", path.display());
        match msg {
            ControlMessage::RequestUDS(nic, pid) => {
                self.request_channel(&addr, &path, r.sender, ChannelKind::Uds, &nic, pid)
            }
            ControlMessage::RequestShm(nic, pid) => {
                self.request_channel(&addr, &path, r.sender, ChannelKind::Shm, &nic, pid)
            }
            ControlMessage::RequestNetmapPipe(nic, pid) => {
                self.request_channel(&addr, &path, r.sender, ChannelKind::NetmapPipe, &nic, pid)
            }
            ControlMessage::AddMatch(m) => {
                let answer = match self.add_match(&path, &m) {
                    Ok(()) => ANSWER_OK,
                    Err(why) => {
                        log::info!("AddMatch {m:?} from {} refused: {why}", path.display());
                        ANSWER_ERR
                    }
                };
                self.answer(&addr, answer, &[]);
            }
            ControlMessage::RemoveMatch(m) => {
                if let Err(why) = self.remove_match(&path, &m) {
                    log::info!("RemoveMatch {m:?} from {} ignored: {why}", path.display());
                }
            }
            ControlMessage::QueryUsedPorts => {
                let json = self.used_ports_answer();
                self.answer(&addr, json.as_bytes(), &[]);
            }
            ControlMessage::DeleteClient => {
                if !self.remove_client(&path, Removal::Deleted) {
                    log::info!("DeleteClient from unknown client {}", path.display());
                }
            }
        }
    }

    /// Sends an answer; failures are logged (the client only hurts itself by not reading).
    fn answer(&self, to: &UnixAddr, bytes: &[u8], fds: &[RawFd]) -> bool {
        match send_answer(&self.socket, to, bytes, fds) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("control socket: cannot answer {to}: {e}");
                false
            }
        }
    }

    /// RequestUDS / RequestShm / RequestNetmapPipe.
    fn request_channel(
        &mut self,
        addr: &UnixAddr,
        path: &PathBuf,
        sender: Sender,
        kind: ChannelKind,
        nic_name: &str,
        pid: i32,
    ) {
        if let Err(why) = self.try_request_channel(addr, path, sender, kind, nic_name, pid) {
            log::info!(
                "{kind:?} channel on {nic_name:?} for {} (pid {pid}) refused: {why}",
                path.display()
            );
            self.answer(addr, ANSWER_ERR, &[]);
        }
    }

    fn try_request_channel(
        &mut self,
        addr: &UnixAddr,
        path: &PathBuf,
        sender: Sender,
        kind: ChannelKind,
        nic_name: &str,
        pid: i32,
    ) -> Result<(), String> {
        let nic = self
            .nics
            .iter()
            .position(|n| n.name == nic_name)
            .ok_or("unknown interface")?;
        match self.clients.get(path) {
            Some(c) if c.channels.len() >= self.limits.max_channels_per_client => {
                return Err("too many channels for this client".into())
            }
            None if self.clients.len() >= self.limits.max_clients => {
                return Err("too many clients".into())
            }
            _ => {}
        }
        let watches = watches_for(pid, sender.pid);
        if watches.is_empty() {
            return Err(format!("process {pid} does not exist"));
        }
        let (header, handover): (Vec<u8>, ChannelHandover) = match kind {
            ChannelKind::Uds => {
                let h = self
                    .channels
                    .create_uds(nic_name)
                    .map_err(|e| e.to_string())?;
                if h.client_fds.len() != 1 {
                    return Err("channel factory gave no single fd".into());
                }
                (ANSWER_FD.to_vec(), h)
            }
            ChannelKind::Shm => {
                let (info, h) = self
                    .channels
                    .create_shm(nic_name)
                    .map_err(|e| e.to_string())?;
                (ControlAnswer::ShmChannel(info).to_json().into_bytes(), h)
            }
            ChannelKind::NetmapPipe => {
                let (nmreq, h) = self
                    .channels
                    .create_netmap_pipe(nic_name)
                    .map_err(|e| e.to_string())?;
                (nmreq, h)
            }
        };
        if handover.client_fds.is_empty() || handover.client_fds.len() > 253 {
            return Err("channel factory gave a bad number of fds".into());
        }
        let ChannelHandover {
            client_fds,
            sink,
            source,
            hangup,
            keep,
        } = handover;
        let endpoint = {
            let mut table = lock(&self.nics[nic].table);
            let id = table.add_endpoint(
                EndpointKind::Client,
                format!("client {pid} {}", path.display()),
                sink,
            );
            table.publish();
            id
        };
        self.sources.attach(nic_name, endpoint, source);
        let raw: Vec<RawFd> = client_fds.iter().map(|f| f.as_raw_fd()).collect();
        if !self.answer(addr, &header, &raw) {
            self.sources.detach(nic_name, endpoint);
            let mut table = lock(&self.nics[nic].table);
            table.remove_endpoint(endpoint);
            table.publish();
            return Err("answer could not be sent".into());
        }
        // The client has its copies now; ours close here.
        drop(client_fds);
        log::info!(
            "{kind:?} channel on {nic_name} for {} (pid {pid}): endpoint {endpoint}",
            path.display()
        );
        self.clients
            .entry(path.clone())
            .or_insert_with(|| Client {
                channels: vec![],
                rules: BTreeSet::new(),
            })
            .channels
            .push(ClientChannel {
                nic,
                endpoint,
                watches,
                hangup,
                _keep: keep,
            });
        Ok(())
    }

    /// AddMatch: validates and adds a client rule for the client's first channel.
    fn add_match(&mut self, path: &PathBuf, m: &UsnetMatch) -> Result<(), String> {
        let client = self.clients.get(path).ok_or("no channel requested yet")?;
        let first = client.channels.first().ok_or("no channel")?;
        let (nic, own) = (first.nic, first.endpoint);
        if client.rules.len() >= self.limits.max_rules_per_client {
            return Err("too many rules for this client".into());
        }
        let key = match_key(m)?;
        let local = key.local_ip.to_std();
        let nic_name = &self.nics[nic].name;
        if proto::has_ports(key.proto) {
            if self.kernel.kernel_listens(key.proto, local, key.local_port) {
                return Err("the kernel listens on this port".into());
            }
            let (lo, hi) = self.kernel.ephemeral_range();
            if !key.remote_ip.is_unspecified()
                && (lo..=hi).contains(&key.local_port)
                && self.kernel.is_kernel_ip(nic_name, local)
            {
                return Err(
                    "local port in the kernel's ephemeral range on a kernel address".into(),
                );
            }
        }
        let mut table = lock(&self.nics[nic].table);
        if let Some(owner) = port_owner_conflict(&table, &key, own) {
            return Err(format!("the local port belongs to endpoint {owner}"));
        }
        match table.add_rule(key, own, Origin::Client) {
            Ok(()) => {}
            Err(RuleError::Exists) => return Err("a rule with this key exists".into()),
            Err(e) => return Err(e.to_string()),
        }
        table.publish();
        drop(table);
        if let Some(c) = self.clients.get_mut(path) {
            c.rules.insert(key);
        }
        Ok(())
    }

    /// RemoveMatch: removes the rule if it belongs to one of the client's endpoints.
    fn remove_match(&mut self, path: &PathBuf, m: &UsnetMatch) -> Result<(), String> {
        let client = self.clients.get_mut(path).ok_or("unknown client")?;
        let key = match_key(m)?;
        for ch in &client.channels {
            let mut table = lock(&self.nics[ch.nic].table);
            if table.rule(&key).is_some_and(|r| r.endpoint == ch.endpoint) {
                table
                    .remove_rule(&key, Some(ch.endpoint))
                    .map_err(|e| e.to_string())?;
                table.publish();
                client.rules.remove(&key);
                return Ok(());
            }
        }
        Err("no such rule of this client".into())
    }

    /// Removes a client with all its channels, endpoints and rules; false if unknown.
    fn remove_client(&mut self, path: &PathBuf, why: Removal) -> bool {
        let Some(client) = self.clients.remove(path) else {
            return false;
        };
        for ch in client.channels {
            let nic = &self.nics[ch.nic];
            self.sources.detach(&nic.name, ch.endpoint);
            let mut table = lock(&nic.table);
            let rules = table.remove_endpoint(ch.endpoint);
            table.publish();
            log::info!(
                "client {} removed ({why:?}): endpoint {} on {} with {rules} rules",
                path.display(),
                ch.endpoint,
                nic.name
            );
        }
        true
    }

    /// The QueryUsedPorts answer over all NICs' rules (deduplicated, sorted, cut to fit).
    fn used_ports_answer(&self) -> String {
        let mut listening = BTreeSet::new();
        let mut connected = BTreeSet::new();
        for nic in &self.nics {
            let table = lock(&nic.table);
            for (k, _) in table.rules() {
                if !proto::has_ports(k.proto) || k.local_port == 0 {
                    continue;
                }
                let entry = (k.proto, WireIp::from(k.local_ip.to_std()), k.local_port);
                if k.remote_ip.is_unspecified() {
                    listening.insert(entry);
                } else {
                    connected.insert(entry);
                }
            }
        }
        let room = self.limits.max_answer_bytes.saturating_sub(64) / MAX_PORT_ENTRY_LEN;
        let total = listening.len() + connected.len();
        let listening: Vec<_> = listening.into_iter().take(room).collect();
        let connected: Vec<_> = connected.into_iter().take(room - listening.len()).collect();
        if listening.len() + connected.len() < total {
            log::warn!(
                "QueryUsedPorts: {total} ports do not fit one answer; sent {}",
                listening.len() + connected.len()
            );
        }
        ControlAnswer::QueryUsedPortsAnswer(UsedPorts {
            listening,
            connected,
        })
        .to_json()
    }
}

/// Locks a NIC's table; a poisoned lock (a panicked holder) is still usable: the table's
/// writer methods leave it consistent.
fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// The processes to watch for a channel requested for `claimed` by the sender `sender`: the
/// claimed pid, as in the original (a launcher may request a channel for another process);
/// when it does not exist here (a client in another pid namespace), the sending process
/// itself, known from its credentials. Empty when neither exists.
fn watches_for(claimed: i32, sender: Option<i32>) -> Vec<Watch> {
    Watch::new(claimed)
        .or_else(|| sender.and_then(Watch::new))
        .into_iter()
        .collect()
}

/// The variant name of a JSON text that did not decode as a request (`"Name"` or
/// `{"Name": ...}`), if it is JSON of that shape.
fn top_level_variant(bytes: &[u8]) -> Option<String> {
    match serde_json::from_slice::<serde_json::Value>(bytes).ok()? {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(m) if m.len() == 1 => m.keys().next().cloned(),
        _ => None,
    }
}

/// Converts a client's rule into a table key, refusing what cannot be a sensible rule.
pub(crate) fn match_key(m: &UsnetMatch) -> Result<FlowKey, String> {
    let local = m.dst_addr.to_std();
    if !usable_unicast(local) {
        return Err(format!("{local} is not a usable local address"));
    }
    let has_ports = proto::has_ports(m.protocol);
    let local_port = match (has_ports, m.dst_port) {
        (true, Some(p)) if p != 0 => p,
        (true, _) => return Err("this protocol needs a local port".into()),
        (false, None) => 0,
        (false, Some(_)) => return Err("this protocol has no ports".into()),
    };
    let (remote_ip, remote_port) = match (m.src_addr, m.src_port) {
        (None, None) => (Ip::UNSPECIFIED, 0),
        (None, Some(_)) => return Err("a remote port needs a remote address".into()),
        (Some(a), port) => {
            let remote = a.to_std();
            if !usable_unicast(remote) || remote.is_ipv4() != local.is_ipv4() {
                return Err(format!("{remote} is not a usable remote address"));
            }
            let port = match (has_ports, port) {
                (_, None) => 0,
                (true, Some(p)) if p != 0 => p,
                (true, Some(_)) => return Err("remote port 0".into()),
                (false, Some(_)) => return Err("this protocol has no ports".into()),
            };
            (Ip::from(remote), port)
        }
    };
    Ok(FlowKey {
        local_ip: Ip::from(local),
        remote_ip,
        local_port,
        remote_port,
        proto: m.protocol,
    })
}

fn usable_unicast(ip: IpAddr) -> bool {
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || broadcast)
}

/// Whether another endpoint owns the local port of `key`: for a rule with a remote address,
/// another endpoint's listening rule on that port; for a listening rule, any rule of another
/// endpoint on that port. Returns the owner.
fn port_owner_conflict(table: &Table, key: &FlowKey, own: EndpointId) -> Option<EndpointId> {
    if !key.is_listening() {
        return table
            .rule(&key.listening())
            .map(|r| r.endpoint)
            .filter(|e| *e != own);
    }
    table
        .rules()
        .find(|(k, r)| {
            r.endpoint != own
                && k.local_ip == key.local_ip
                && k.proto == key.proto
                && k.local_port == key.local_port
        })
        .map(|(_, r)| r.endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(
        dst: &str,
        dport: Option<u16>,
        src: Option<&str>,
        sport: Option<u16>,
        p: u8,
    ) -> UsnetMatch {
        UsnetMatch {
            dst_addr: WireIp::from(dst.parse::<IpAddr>().unwrap()),
            dst_port: dport,
            src_addr: src.map(|s| WireIp::from(s.parse::<IpAddr>().unwrap())),
            src_port: sport,
            protocol: p,
        }
    }

    #[test]
    fn match_keys_are_validated() {
        let k = match_key(&m("10.0.0.2", Some(80), None, None, 6)).unwrap();
        assert!(k.is_listening());
        assert_eq!(k.local_port, 80);
        let k = match_key(&m("10.0.0.2", Some(40001), Some("10.0.0.1"), Some(443), 6)).unwrap();
        assert_eq!((k.remote_port, k.remote_ip), (443, Ip::v4([10, 0, 0, 1])));
        assert!(match_key(&m("10.0.0.2", None, None, None, 1)).is_ok());
        assert!(match_key(&m("2001:db8::2", Some(80), None, None, 6)).is_ok());
        for bad in [
            m("0.0.0.0", Some(80), None, None, 6),
            m("127.0.0.1", Some(80), None, None, 6),
            m("224.0.0.1", Some(80), None, None, 17),
            m("255.255.255.255", Some(80), None, None, 17),
            m("10.0.0.2", None, None, None, 6),
            m("10.0.0.2", Some(0), None, None, 6),
            m("10.0.0.2", Some(1), None, None, 1),
            m("10.0.0.2", Some(80), None, Some(5), 6),
            m("10.0.0.2", Some(80), Some("2001:db8::1"), Some(5), 6),
            m("10.0.0.2", Some(80), Some("10.0.0.1"), Some(0), 6),
        ] {
            assert!(match_key(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn variant_names_of_undecodable_requests() {
        assert_eq!(top_level_variant(br#""Frob""#).as_deref(), Some("Frob"));
        assert_eq!(
            top_level_variant(br#"{"RemoveMatch":{"x":1}}"#).as_deref(),
            Some("RemoveMatch")
        );
        assert_eq!(top_level_variant(b"end"), None);
        assert_eq!(top_level_variant(br#"{"a":1,"b":2}"#), None);
    }
}
