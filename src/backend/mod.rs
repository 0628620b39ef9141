//! NIC access backends. Each opens a claimed interface and hands out the data plane's port
//! queues ([`usnetd_shards::port::RxQueue`], [`usnetd_shards::port::TxQueue`]).

pub mod bpf;
pub mod kernel_pass;
pub mod xdp;

use std::io;

pub mod macvtap;
pub mod packet;
pub mod sysutil;

use usnetd_shards::port::{RxQueue, TxQueue};

/// The queues a backend opened on one NIC.
pub struct NicPorts {
    /// One receive queue per NIC receive queue (RSS queue, fanout member, ...); the daemon
    /// spreads them over the workers.
    pub rx: Vec<Box<dyn RxQueue>>,
    /// Transmit queues, each to be owned by one thread (one per worker plus one for the
    /// kernel core): as many as were asked for.
    pub tx: Vec<Box<dyn TxQueue>>,
    /// The XDP program's kernel fast path, when the backend has one (`backend::kernel_pass`):
    /// the daemon keeps its map equal to the kernel's rules.
    pub kernel_pass: Option<std::sync::Arc<kernel_pass::KernelPass>>,
}

/// A way to access a NIC.
pub trait Backend {
    /// The backend's name as used in the `BACKEND` setting (`xdp`, `packet`, ...).
    fn name(&self) -> &'static str;
    /// Claims `ifname`: after this, the kernel sees the NIC's frames only through the switch.
    /// Returns its receive queues and `tx_queues` transmit queues.
    fn open(&self, ifname: &str, tx_queues: usize) -> io::Result<NicPorts>;
}

#[cfg(feature = "netmap")]
pub mod netmap;
