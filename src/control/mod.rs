//! The control socket: clients attach, get packet channels and register rules here.
//!
//! API (what the daemon uses):
//! - [`bind_control_socket`]: binds the datagram socket (mode 0770, group `ALLOW_GID`).
//! - [`ControlServer::new`] with the NICs' tables ([`NicControl`]) and three plug-ins:
//!   [`ChannelFactory`] (makes the packet channels), [`SourceAssigner`] (gives a channel's
//!   receiving side to a worker), [`KernelPorts`] (what the host kernel uses, for validation).
//! - [`ControlServer::poll_once`], called in a loop by the control thread: answers requests
//!   and removes dead clients (process exit via pidfd, channel hang-up) within a second.
//!
//! The wire format is `usnetd_client::protocol` (see `PROTOCOL.md`). Choices where the
//! protocol is silent:
//! - A client is identified by the path its requests come from. A datagram from an unbound
//!   sender cannot be answered and is ignored (logged); senders with an abstract address get
//!   `ER` to every request that has an answer (they cannot be tied to a client).
//! - A datagram that does not decode (not UTF-8, not JSON, unknown variant, bad fields,
//!   larger than 4000 bytes) gets `ER`, unless its top-level variant name can be read and is
//!   one without answer (`RemoveMatch`, `DeleteClient`): a client waiting for an answer must
//!   not block, and a client that sent a request without answer must not find a stray `ER`.
//! - A client's rules go to its first channel's endpoint (as in the original, where the first
//!   endpoint registered under the client's path got them).
//! - The pid of a channel request is watched (pidfd, or `/proc/PID` every second where
//!   pidfd_open fails), as in the original; a pid that does not exist in the daemon's pid
//!   namespace is replaced by the sender's pid from its credentials; if neither exists: `ER`.
//!   When a watched process (or thread) exits, or a channel hangs up, the whole client is
//!   removed: all its channels, endpoints and rules. A client naming a long-lived foreign pid
//!   keeps only its own registration alive (bounded by [`ClientLimits`]).

mod liveness;
mod server;
mod socket;

use std::any::Any;
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use usnetd_client::protocol::ShmChannelInfo;
use usnetd_shards::endpoint::{EndpointId, EndpointSink};
use usnetd_shards::port::RxQueue;
use usnetd_shards::table::Table;

pub use server::ControlServer;
pub use socket::bind_control_socket;

/// A packet channel just created for a client: what is handed over, and what the switch keeps.
pub struct ChannelHandover {
    /// The fds sent to the client by `SCM_RIGHTS`, in wire order (at most 253).
    pub client_fds: Vec<OwnedFd>,
    /// Where workers deliver frames for the client.
    pub sink: Arc<dyn EndpointSink>,
    /// The frames the client sends; given to a worker through [`SourceAssigner::attach`].
    pub source: Box<dyn RxQueue>,
    /// An fd that reports `POLLHUP` or `POLLERR` once the client closed its end, if the
    /// channel kind has one (a datagram socket pair does not: the process watch covers it).
    pub hangup: Option<OwnedFd>,
    /// Resources that must live as long as the channel (netmap pipe id, the switch's fds...);
    /// dropped when the client is removed.
    pub keep: Option<Box<dyn Any + Send>>,
}

/// Makes packet channels; implemented by the daemon with `crate::channel`.
pub trait ChannelFactory: Send {
    /// A Unix datagram socket pair channel for `nic`: exactly one client fd.
    fn create_uds(&self, nic: &str) -> io::Result<ChannelHandover>;

    /// A shared-memory ring channel for `nic`: its parameters (sent as JSON) and fds (memfd
    /// first, then the eventfds; see `usnetd_client::protocol`).
    fn create_shm(&self, nic: &str) -> io::Result<(ShmChannelInfo, ChannelHandover)>;

    /// A netmap pipe for `nic`: the raw bytes of the client end's legacy `struct nmreq` and one
    /// client fd. Without netmap support: `Unsupported` (the client gets `ER`).
    fn create_netmap_pipe(&self, nic: &str) -> io::Result<(Vec<u8>, ChannelHandover)> {
        let _ = nic;
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "netmap pipes are not supported by this daemon",
        ))
    }
}

/// Hands the receiving side of client channels to the workers (the daemon sends
/// `WorkerCommand::AttachSource` / `DetachSource`).
pub trait SourceAssigner: Send {
    /// Starts polling `source` for frames `endpoint` of `nic` sends.
    fn attach(&self, nic: &str, endpoint: EndpointId, source: Box<dyn RxQueue>);
    /// Stops polling the source of `endpoint` of `nic` and drops it.
    fn detach(&self, nic: &str, endpoint: EndpointId);
}

/// What the host kernel uses; rules that would take its traffic are refused.
pub trait KernelPorts: Send {
    /// Whether the kernel has a listening socket (TCP listen, any bound UDP socket) for
    /// `proto` on `port` at `ip` or at the wildcard address of its family.
    fn kernel_listens(&self, proto: u8, ip: IpAddr, port: u16) -> bool;
    /// The kernel's ephemeral port range (`ip_local_port_range`), inclusive; `lo > hi` means
    /// empty.
    fn ephemeral_range(&self) -> (u16, u16);
    /// Whether `ip` is one of the kernel's addresses on `nic`.
    fn is_kernel_ip(&self, nic: &str, ip: IpAddr) -> bool;
}

/// [`KernelPorts`] for a switch without kernel endpoint (or tests): the kernel uses nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoKernelPorts;

impl KernelPorts for NoKernelPorts {
    fn kernel_listens(&self, _proto: u8, _ip: IpAddr, _port: u16) -> bool {
        false
    }
    fn ephemeral_range(&self) -> (u16, u16) {
        (1, 0)
    }
    fn is_kernel_ip(&self, _nic: &str, _ip: IpAddr) -> bool {
        false
    }
}

/// One claimed NIC as the control server sees it.
#[derive(Clone)]
pub struct NicControl {
    /// The interface name clients ask for (`eth0`).
    pub name: String,
    /// The NIC's rule table (shared with the workers' learning slow path).
    pub table: Arc<Mutex<Table>>,
}

/// Per-client and global limits, so that no client can exhaust the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientLimits {
    /// Clients (distinct socket paths with a channel) at once.
    pub max_clients: usize,
    /// Channels one client may hold.
    pub max_channels_per_client: usize,
    /// Rules one client may add with AddMatch (learned rules are not counted).
    pub max_rules_per_client: usize,
    /// The largest answer to QueryUsedPorts (bytes); longer lists are cut (and logged).
    pub max_answer_bytes: usize,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            max_clients: 1024,
            max_channels_per_client: 8,
            max_rules_per_client: 16384,
            max_answer_bytes: 200_000,
        }
    }
}
