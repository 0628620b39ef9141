//! The netmap backend (cargo feature `netmap`; needs the netmap kernel module at run time).
//!
//! API:
//! - [`NetmapBackend`]: [`Backend`] over `/dev/netmap`. `open` registers one fd per hardware
//!   ring pair (`NR_REG_ONE_NIC`, i.e. `netmap:IF-N`): rx queue N and tx queue N are that
//!   fd's rings, so each worker owns its rings. [`NetmapBackend::open_host_rings`] registers
//!   the host rings (`NR_REG_SW`, `netmap:IF^`) for the daemon's kernel core.
//! - [`pipe::create_pipe`]: netmap pipes for clients (`RequestNetmapPipe`).
//! - [`ring`]: the safe ring API (all `unsafe` of the backend is there and in [`port`]);
//!   [`memring`]: in-memory rings with netmap's layout for tests.
//!
//! Without `/dev/netmap`, `open` fails with `NotFound` ("netmap module not loaded"), so the
//! daemon's `auto` selection falls back to another backend.

pub mod memring;
pub mod nmreq;
pub mod pipe;
pub mod port;
pub mod ring;

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use usnetd_shards::endpoint::EndpointSink;
use usnetd_shards::port::{RxQueue, TxQueue};

use crate::backend::{Backend, NicPorts};
use nmreq::Registration;
use port::{NetmapDevice, Port};
use ring::SharedTx;

/// The netmap backend.
#[derive(Clone, Debug)]
pub struct NetmapBackend {
    device: NetmapDevice,
    zero_copy: bool,
}

/// The host (kernel) side of a NIC: netmap's host rings.
pub struct HostRings {
    /// Frames delivered here go up to the kernel's network stack (written to the host tx
    /// ring). Shared by all workers behind a lock (one ring).
    pub sink: Arc<dyn EndpointSink>,
    /// Frames the kernel sends out of the NIC (read from the host rx ring).
    pub source: Box<dyn RxQueue>,
}

impl NetmapBackend {
    /// A backend on `/dev/netmap`. `zero_copy` is false with `NO_ZERO_COPY=true`.
    pub fn new(zero_copy: bool) -> Self {
        NetmapBackend {
            device: NetmapDevice::default(),
            zero_copy,
        }
    }

    /// A backend on another device node (tests).
    pub fn with_device(device: NetmapDevice, zero_copy: bool) -> Self {
        NetmapBackend { device, zero_copy }
    }

    /// The device.
    pub fn device(&self) -> &NetmapDevice {
        &self.device
    }

    /// Whether buffer swaps are allowed.
    pub fn zero_copy(&self) -> bool {
        self.zero_copy
    }

    /// Registers the host rings of `ifname` (`netmap:IF^`). netmap's naming, seen from
    /// userspace: frames the kernel sends appear on the host *rx* ring, frames written to the
    /// host *tx* ring are passed up to the kernel.
    pub fn open_host_rings(&self, ifname: &str) -> io::Result<HostRings> {
        let port = Port::open(&self.device, ifname, Registration::Host)?;
        let layout = port.layout();
        if layout.host_tx_rings == 0 || layout.host_rx_rings == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{ifname} has no netmap host rings"),
            ));
        }
        let tx = port.tx(layout.tx_rings, self.zero_copy)?;
        let rx = port.rx(layout.rx_rings)?;
        Ok(HostRings {
            sink: Arc::new(SharedTx::new(tx)),
            source: Box::new(rx),
        })
    }

    /// Creates a client pipe on `nic` (see [`pipe::create_pipe`]).
    pub fn create_pipe(
        &self,
        pool: &Arc<pipe::PipeIdPool>,
        nic: &str,
    ) -> io::Result<(Vec<u8>, crate::control::ChannelHandover)> {
        pipe::create_pipe(&self.device, pool, nic, self.zero_copy)
    }
}

impl Backend for NetmapBackend {
    fn name(&self) -> &'static str {
        "netmap"
    }

    fn open(&self, ifname: &str, tx_queues: usize) -> io::Result<NicPorts> {
        let info_fd = self.device.open()?;
        let info = nmreq::get_info(info_fd.as_fd(), ifname)?;
        drop(info_fd);
        let (nrx, ntx) = (u32::from(info.nr_rx_rings), u32::from(info.nr_tx_rings));
        if nrx == 0 || ntx == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("netmap reports {nrx} rx / {ntx} tx rings on {ifname}"),
            ));
        }
        let mut rx: Vec<Box<dyn RxQueue>> = Vec::new();
        let mut hw_tx = Vec::new();
        for ring in 0..nrx.max(ntx) {
            let port = Port::open(&self.device, ifname, Registration::OneNic(ring as u16))?;
            if ring < nrx {
                rx.push(Box::new(port.rx(ring)?));
            }
            if ring < ntx {
                hw_tx.push(port.tx(ring, self.zero_copy)?);
            }
        }
        let tx = assign_tx_queues(hw_tx, tx_queues);
        log::info!(
            "netmap: {ifname}: {} rx rings, {} tx rings for {} tx queues",
            rx.len(),
            ntx,
            tx.len()
        );
        Ok(NicPorts {
            rx,
            tx,
            kernel_pass: None,
        })
    }
}

/// Gives each of `wanted` transmit queues a hardware ring: its own when there are enough,
/// otherwise queue q shares ring q % rings with the others behind a lock.
pub fn assign_tx_queues<Q: TxQueue + 'static>(
    rings: Vec<Q>,
    wanted: usize,
) -> Vec<Box<dyn TxQueue>> {
    if wanted <= rings.len() {
        return rings
            .into_iter()
            .take(wanted)
            .map(|q| Box::new(q) as Box<dyn TxQueue>)
            .collect();
    }
    let shared: Vec<_> = rings
        .into_iter()
        .map(|q| Arc::new(std::sync::Mutex::new(q)))
        .collect();
    (0..wanted)
        .map(|q| Box::new(LockedTx(shared[q % shared.len()].clone())) as Box<dyn TxQueue>)
        .collect()
}

/// A transmit queue shared behind a lock.
struct LockedTx<Q>(Arc<std::sync::Mutex<Q>>);

impl<Q: TxQueue> TxQueue for LockedTx<Q> {
    fn send(&mut self, frames: &[&[u8]]) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(frames)
    }
}
