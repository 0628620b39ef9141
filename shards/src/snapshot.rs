//! Immutable rule snapshots: what the workers read, lock-free, through `arc-swap`.
//!
//! PLACEHOLDER internals (a whole-table copy per publish); the API is the contract.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::endpoint::{Endpoint, EndpointId};
use crate::key::FlowKey;

/// Where a rule came from; decides ageing and ownership.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// From the configuration (DEBUG_PORTS, STATIC_PIPES, static sockets): never aged.
    Static,
    /// Added by a client with AddMatch.
    Client,
    /// Learned from a frame an endpoint sent (first writer wins; kernel ones age).
    Learned,
}

/// What a rule maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    /// The endpoint that receives matching frames.
    pub endpoint: EndpointId,
    /// Where the rule came from.
    pub origin: Origin,
}

/// One immutable view of a NIC's rules and endpoints.
#[derive(Default)]
pub struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) rules: HashMap<FlowKey, RuleEntry>,
    pub(crate) endpoints: Vec<Option<Arc<Endpoint>>>,
    pub(crate) macs: HashMap<[u8; 6], EndpointId>,
    pub(crate) has_remote_ip_only: bool,
}

impl Snapshot {
    /// Finds the endpoint for a frame's key: the connection rule (exact 5-tuple) first, then a
    /// rule with the remote address but no remote port, then the listening rule.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<EndpointId> {
        if let Some(e) = self.rules.get(key) {
            return Some(e.endpoint);
        }
        if self.has_remote_ip_only {
            if let Some(e) = self.rules.get(&key.remote_ip_only()) {
                return Some(e.endpoint);
            }
        }
        self.rules.get(&key.listening()).map(|e| e.endpoint)
    }

    /// Looks up a batch of keys (`out[i]` for `keys[i]`); faster than one by one on large
    /// tables. `out` must be at least as long as `keys`.
    pub fn lookup_batch(&self, keys: &[FlowKey], out: &mut [Option<EndpointId>]) {
        for (k, o) in keys.iter().zip(out.iter_mut()) {
            *o = self.lookup(k);
        }
    }

    /// The rule stored under exactly this key, if any.
    #[inline]
    pub fn rule(&self, key: &FlowKey) -> Option<RuleEntry> {
        self.rules.get(key).copied()
    }

    /// The endpoint with this id, if it exists in this snapshot.
    #[inline]
    pub fn endpoint(&self, id: EndpointId) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(id.index()).and_then(|e| e.as_ref())
    }

    /// All endpoints of the snapshot.
    pub fn endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.endpoints.iter().flatten()
    }

    /// The local endpoint that owns a MAC address (learned or ADD_MACS), if any.
    #[inline]
    pub fn endpoint_by_mac(&self, mac: &[u8; 6]) -> Option<EndpointId> {
        self.macs.get(mac).copied()
    }

    /// Increases by one with every publish.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }
}

/// The workers' handle on the current snapshot of one NIC. Cheap to clone.
#[derive(Clone)]
pub struct SnapshotReader {
    pub(crate) current: Arc<ArcSwap<Snapshot>>,
}

impl SnapshotReader {
    /// The current snapshot (lock-free; keep it for one batch, then load again).
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot as an owned `Arc`.
    pub fn load_full(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}
