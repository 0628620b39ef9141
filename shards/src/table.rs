//! The rule table's writer side: the one place where rules and endpoints change. Changes are
//! collected and made visible to all workers at once by [`Table::publish`].
//!
//! PLACEHOLDER internals; the API is the contract.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::endpoint::{Endpoint, EndpointId, EndpointKind, EndpointSink};
use crate::key::FlowKey;
use crate::snapshot::{Origin, RuleEntry, Snapshot, SnapshotReader};

/// Why a rule change was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleError {
    /// A rule with exactly this key exists already.
    Exists,
    /// No rule with this key exists.
    NotFound,
    /// The rule belongs to another endpoint.
    NotOwner,
    /// The endpoint does not exist.
    NoEndpoint,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleError::Exists => "a rule with this key exists",
            RuleError::NotFound => "no such rule",
            RuleError::NotOwner => "the rule belongs to another endpoint",
            RuleError::NoEndpoint => "no such endpoint",
        })
    }
}

impl std::error::Error for RuleError {}

/// The writer of one NIC's rules and endpoints.
pub struct Table {
    rules: HashMap<FlowKey, RuleEntry>,
    endpoints: Vec<Option<Arc<Endpoint>>>,
    macs: HashMap<[u8; 6], EndpointId>,
    generation: u64,
    current: Arc<ArcSwap<Snapshot>>,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

impl Table {
    /// An empty table with an empty published snapshot.
    pub fn new() -> Table {
        Table {
            rules: HashMap::new(),
            endpoints: Vec::new(),
            macs: HashMap::new(),
            generation: 0,
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
        }
    }

    /// A handle for workers to read published snapshots.
    pub fn reader(&self) -> SnapshotReader {
        SnapshotReader {
            current: self.current.clone(),
        }
    }

    /// Adds an endpoint (taking the lowest free id) and returns its id.
    pub fn add_endpoint(
        &mut self,
        kind: EndpointKind,
        name: String,
        sink: Arc<dyn EndpointSink>,
    ) -> EndpointId {
        let idx = self
            .endpoints
            .iter()
            .position(|e| e.is_none())
            .unwrap_or(self.endpoints.len());
        let id = EndpointId(idx as u32);
        let ep = Arc::new(Endpoint {
            id,
            kind,
            name,
            sink,
        });
        if idx == self.endpoints.len() {
            self.endpoints.push(Some(ep));
        } else {
            self.endpoints[idx] = Some(ep);
        }
        id
    }

    /// Removes an endpoint with all its rules and MACs; returns the number of rules removed.
    pub fn remove_endpoint(&mut self, id: EndpointId) -> usize {
        if let Some(slot) = self.endpoints.get_mut(id.index()) {
            *slot = None;
        }
        self.macs.retain(|_, e| *e != id);
        let before = self.rules.len();
        self.rules.retain(|_, r| r.endpoint != id);
        before - self.rules.len()
    }

    /// The endpoint with this id.
    pub fn endpoint(&self, id: EndpointId) -> Option<&Arc<Endpoint>> {
        self.endpoints.get(id.index()).and_then(|e| e.as_ref())
    }

    /// Adds a rule; `Exists` when a rule with exactly this key exists (any owner).
    pub fn add_rule(
        &mut self,
        key: FlowKey,
        endpoint: EndpointId,
        origin: Origin,
    ) -> Result<(), RuleError> {
        if self.endpoint(endpoint).is_none() {
            return Err(RuleError::NoEndpoint);
        }
        if self.rules.contains_key(&key) {
            return Err(RuleError::Exists);
        }
        self.rules.insert(key, RuleEntry { endpoint, origin });
        Ok(())
    }

    /// Learns a rule from an outgoing frame: first writer wins, nothing is overwritten.
    /// Returns whether the rule was added.
    pub fn learn(&mut self, key: FlowKey, endpoint: EndpointId) -> bool {
        self.add_rule(key, endpoint, Origin::Learned).is_ok()
    }

    /// Removes a rule. With `owner`, only that endpoint's rule is removed (`NotOwner` else).
    pub fn remove_rule(
        &mut self,
        key: &FlowKey,
        owner: Option<EndpointId>,
    ) -> Result<RuleEntry, RuleError> {
        match self.rules.get(key) {
            None => Err(RuleError::NotFound),
            Some(r) if owner.is_some_and(|o| o != r.endpoint) => Err(RuleError::NotOwner),
            Some(_) => Ok(self.rules.remove(key).expect("present")),
        }
    }

    /// Removes the learned rules of `endpoint` for which `keep` returns false; returns how
    /// many were removed. Static and client rules are never aged.
    pub fn age_learned(
        &mut self,
        endpoint: EndpointId,
        keep: &mut dyn FnMut(&FlowKey) -> bool,
    ) -> usize {
        let before = self.rules.len();
        self.rules
            .retain(|k, r| !(r.endpoint == endpoint && r.origin == Origin::Learned) || keep(k));
        before - self.rules.len()
    }

    /// The rule stored under exactly this key.
    pub fn rule(&self, key: &FlowKey) -> Option<RuleEntry> {
        self.rules.get(key).copied()
    }

    /// All rules (unordered).
    pub fn rules(&self) -> impl Iterator<Item = (&FlowKey, &RuleEntry)> {
        self.rules.iter()
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Records that `mac` belongs to a local endpoint (frames sent to it are switched locally).
    pub fn add_mac(&mut self, mac: [u8; 6], endpoint: EndpointId) {
        self.macs.insert(mac, endpoint);
    }

    /// Makes every change since the last publish visible to all workers at once.
    pub fn publish(&mut self) {
        self.generation += 1;
        let snap = Snapshot {
            generation: self.generation,
            rules: self.rules.clone(),
            endpoints: self.endpoints.clone(),
            macs: self.macs.clone(),
            has_remote_ip_only: self
                .rules
                .keys()
                .any(|k| !k.remote_ip.is_unspecified() && k.remote_port == 0),
        };
        self.current.store(Arc::new(snap));
    }
}
