//! Endpoints: where matched frames go (the host kernel or a userspace client), and the channel
//! trait through which workers deliver to them.

use std::fmt;
use std::sync::Arc;

use crate::offload::VnetHdr;

/// Identifies an endpoint within one NIC's table. Small and dense (ids are reused after an
/// endpoint is removed), so workers can index per-endpoint counters by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointId(pub u32);

impl EndpointId {
    /// The id as an index into per-endpoint arrays.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Debug for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ep{}", self.0)
    }
}

impl fmt::Display for EndpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ep{}", self.0)
    }
}

/// What kind of endpoint this is; the firewall treats the kernel differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    /// The host kernel's network stack behind the switch (TAP device or netmap host rings).
    Kernel,
    /// A userspace network stack attached over the control socket or configured statically.
    Client,
}

/// The receiving side of an endpoint's packet channel, as seen by the workers.
///
/// Implementations must be callable from every worker at once: `worker` is the calling
/// worker's index, so a channel with one ring per worker (the shared-memory channel) needs no
/// lock. Delivery never blocks: what does not fit is refused and counted by the caller.
pub trait EndpointSink: Send + Sync {
    /// Copies `frames` into the endpoint's channel in order; returns how many were accepted.
    fn deliver(&self, worker: usize, frames: &[&[u8]]) -> usize;

    /// Whether the channel takes frames with offload metadata whole
    /// ([`EndpointSink::deliver_offloaded`]): partial checksums and TCP super-segments. Only
    /// the kernel's side does (a TAP with vnet headers); for every other endpoint the worker
    /// makes wire frames first ([`crate::offload::SoftwareOffload`]). The default is `false`.
    fn accepts_offloads(&self) -> bool {
        false
    }

    /// Like [`EndpointSink::deliver`], with each frame's offload metadata (`offloads[i]`
    /// belongs to `frames[i]`). Called only when [`EndpointSink::accepts_offloads`]; the
    /// default ignores the metadata.
    fn deliver_offloaded(&self, worker: usize, frames: &[&[u8]], offloads: &[VnetHdr]) -> usize {
        let _ = offloads;
        self.deliver(worker, frames)
    }
}

/// An endpoint as the workers see it in a snapshot.
pub struct Endpoint {
    /// The endpoint's id in its NIC's table.
    pub id: EndpointId,
    /// Kernel or client.
    pub kind: EndpointKind,
    /// A short name for logs and counters ("kernel", "client 4242", ...).
    pub name: String,
    /// Where frames for this endpoint are delivered.
    pub sink: Arc<dyn EndpointSink>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish()
    }
}
