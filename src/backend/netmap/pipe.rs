//! netmap pipes as client packet channels (`RequestNetmapPipe`).
//!
//! API: [`PipeIdPool`] (ids, leased as [`PipeId`] guards that give the id back on drop),
//! [`create_pipe`] (what the daemon's `ChannelFactory::create_netmap_pipe` calls).
//!
//! Pipe ids: netmap names pipes `IF{N` (master) / `IF}N` (slave) with N in 0..=4095
//! (`NETMAP_RING_MASK`). We split that space:
//! - static pipes (`STATIC_PIPES`): 4094 counting down, as in the original (`netmap:eth0{4094`
//!   is the first), at most [`STATIC_PIPE_IDS`]`.len()` of them: 3072..=4094;
//! - dynamic pipes (`RequestNetmapPipe`): [`DYNAMIC_PIPE_IDS`] = 0..=3071, handed out in
//!   order and given back at the end of the queue, so an id freed just now (whose master end a
//!   slow client may still hold open) is reused last;
//! - 4095 is unused (the original's range stopped at 4094 too).
//!
//! The client gets the master end (fd plus the raw `struct nmreq` bytes its registration
//! returned: PROTOCOL.md), the switch keeps the slave end: its tx ring is the endpoint's sink
//! (shared by the workers behind a lock: a pipe has one ring pair), its rx ring the source.
//! Pipes use the memory allocator of their interface, so frames can move between the NIC's
//! rings and a pipe by buffer swap (see `ring::NetmapRx::forward_lent`).

use std::collections::VecDeque;
use std::io;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use usnetd_shards::endpoint::EndpointSink;

use super::nmreq::{self, Registration};
use super::port::{NetmapDevice, Port};
use super::ring::SharedTx;
use crate::control::ChannelHandover;

/// Ids for pipes created on request.
pub const DYNAMIC_PIPE_IDS: RangeInclusive<u16> = 0..=3071;
/// Ids for static pipes, used from the top down (4094 first).
pub const STATIC_PIPE_IDS: RangeInclusive<u16> = 3072..=4094;

/// A pool of pipe ids.
pub struct PipeIdPool {
    free: Mutex<VecDeque<u16>>,
}

impl PipeIdPool {
    /// A pool handing out `ids` in the given order.
    pub fn new(ids: impl IntoIterator<Item = u16>) -> Arc<PipeIdPool> {
        Arc::new(PipeIdPool {
            free: Mutex::new(ids.into_iter().collect()),
        })
    }

    /// The pool for dynamic pipes ([`DYNAMIC_PIPE_IDS`], lowest first).
    pub fn dynamic() -> Arc<PipeIdPool> {
        PipeIdPool::new(DYNAMIC_PIPE_IDS)
    }

    /// The pool for static pipes ([`STATIC_PIPE_IDS`], 4094 first, counting down).
    pub fn static_pipes() -> Arc<PipeIdPool> {
        PipeIdPool::new(STATIC_PIPE_IDS.rev())
    }

    /// Leases the next free id; `None` when all are in use.
    pub fn allocate(self: &Arc<Self>) -> Option<PipeId> {
        let id = self.lock().pop_front()?;
        Some(PipeId {
            id,
            pool: self.clone(),
        })
    }

    /// Number of free ids.
    pub fn free(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u16>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A leased pipe id; given back to its pool when dropped.
pub struct PipeId {
    id: u16,
    pool: Arc<PipeIdPool>,
}

impl PipeId {
    /// The id.
    pub fn get(&self) -> u16 {
        self.id
    }
}

impl std::fmt::Debug for PipeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PipeId({})", self.id)
    }
}

impl Drop for PipeId {
    fn drop(&mut self) {
        self.pool.lock().push_back(self.id);
    }
}

/// Creates a pipe on `nic` with an id from `pool`: registers the master end (`nic{N`) for
/// the client and the slave end (`nic}N`) for the switch. Returns the master's `nmreq` bytes
/// and the handover (client fd: the master; sink/source: the slave's rings; `keep`: the id
/// lease, which the sink and source hold too, so the id is given back only when all three are
/// gone). `zero_copy`: whether buffer swaps into the pipe's tx ring are allowed.
pub fn create_pipe(
    device: &NetmapDevice,
    pool: &Arc<PipeIdPool>,
    nic: &str,
    zero_copy: bool,
) -> io::Result<(Vec<u8>, ChannelHandover)> {
    nmreq::validate_ifname(nic)?;
    let id = pool
        .allocate()
        .ok_or_else(|| io::Error::other("netmap pipe ids exhausted"))?;
    let n = id.get();
    let (master_fd, master_req) = Port::register_only(device, nic, Registration::PipeMaster(n))?;
    let slave = Port::open(device, nic, Registration::PipeSlave(n))?;
    let lease: Arc<dyn std::any::Any + Send + Sync> = Arc::new(id);
    let sink = SharedTx::new(slave.tx(0, zero_copy)?.keep(lease.clone()));
    let source = slave.rx(0)?.keep(lease.clone());
    let sink: Arc<dyn EndpointSink> = Arc::new(sink);
    let handover = ChannelHandover {
        client_fds: vec![master_fd],
        sink,
        source: Box::new(source),
        hangup: None,
        keep: Some(Box::new(lease)),
    };
    Ok((nmreq::to_bytes(&master_req).to_vec(), handover))
}
