//! The rule table's writer side: the one place where rules and endpoints change. Changes are
//! collected and made visible to all workers at once by [`Table::publish`].
//!
//! # How a publish stays cheap on a table of a million rules
//!
//! The rules live in two layers (see [`crate::snapshot`] for the lookup side):
//!
//! - an immutable **base** table (`Arc`), shared by the writer and every snapshot built since
//!   the last merge;
//! - a **delta**: for every key changed since the base was built, its current rule or a
//!   tombstone. The delta is split by hash into 64 chunks, each behind an `Arc`; the writer
//!   changes a chunk with `Arc::make_mut`, so the first change to a chunk after a publish
//!   copies only that chunk (the delta's size / 64 entries), and a publish clones 64 `Arc`s.
//!
//! Once the delta holds `max(MergePolicy::min_delta, base rules / 64)` keys, the next publish
//! hands the base and a frozen copy of the delta (the same `Arc`s, nothing is copied) to a
//! background merge thread, which copies the base's flat slot array (one `memcpy`, or a
//! rehash into a bigger or smaller array when the load calls for it) and applies the frozen
//! delta to it. The writer keeps working meanwhile; a later publish picks the new base up and
//! keeps only the delta entries that changed after the freeze. While a merge is in flight, a
//! key of the frozen delta always stays in the writer's delta, so `base + delta` is exact for
//! the old base and `new base + remaining delta` for the new one.
//!
//! Old bases are retired: the writer keeps an `Arc` on each until no snapshot uses it any
//! more, then hands it to the merge thread to free, so neither a worker dropping its last
//! snapshot nor the writer ever frees a large table on its own time.
//!
//! With [`MergePolicy::background`] false, or when no thread can be started, merges run
//! inside [`Table::publish`] instead.

use std::fmt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;

use crate::endpoint::{Endpoint, EndpointId, EndpointKind, EndpointSink};
use crate::key::FlowKey;
use crate::snapshot::{
    delta_chunk_of, BaseTable, DeltaChunk, KeyHasher, MacMap, Origin, RuleEntry, Snapshot,
    SnapshotReader, DELTA_CHUNKS,
};

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

/// When and where the table merges its delta layer into a new base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MergePolicy {
    /// A merge starts once the delta holds this many keys (or 1/64 of the base's rules, if
    /// that is more).
    pub min_delta: usize,
    /// Merge on a background thread (`true`) or inside [`Table::publish`] (`false`).
    pub background: bool,
}

impl Default for MergePolicy {
    fn default() -> Self {
        MergePolicy {
            min_delta: 1024,
            background: true,
        }
    }
}

/// Rules per endpoint, so that removing or ageing an endpoint without rules costs nothing.
#[derive(Clone, Copy, Default)]
struct EndpointRules {
    rules: usize,
    learned: usize,
    /// Local MACs of the endpoint (learned or static).
    macs: usize,
}

/// Local MACs an endpoint may have for the switch to learn another one from the frames it
/// sends; a frame from a further source MAC is still forwarded, but its MAC is not learned
/// (counted: [`Table::macs_refused`]). Static MACs ([`Table::add_mac`], ADD_MACS) count, but
/// are always added.
pub const MAX_LEARNED_MACS_PER_ENDPOINT: usize = 16;

enum MergeJob {
    Merge(Arc<BaseTable>, Vec<Arc<DeltaChunk>>),
    Free(Arc<BaseTable>),
}

struct MergeThread {
    jobs: Option<mpsc::Sender<MergeJob>>,
    done: mpsc::Receiver<BaseTable>,
    handle: Option<JoinHandle<()>>,
}

struct Merger {
    policy: MergePolicy,
    thread: Option<MergeThread>,
    /// The delta handed to the running background merge.
    in_flight: Option<Vec<Arc<DeltaChunk>>>,
    /// Old bases, kept until no snapshot uses them.
    retired: Vec<Arc<BaseTable>>,
}

/// Told of every rule and local MAC added to or removed from a [`Table`] as the change is made
/// (before it is published): for copies kept outside the switch, such as the kernel's fast
/// path in BPF maps. Runs under the table's lock: keep it short.
pub trait RuleObserver: Send {
    /// `key` now maps to `entry` (`added`), or no longer does (`!added`).
    fn rule_changed(&mut self, key: &FlowKey, entry: &RuleEntry, added: bool);

    /// `mac` is now a local endpoint's (`added`: `endpoint`'s), or no endpoint's any more.
    fn mac_changed(&mut self, mac: &[u8; 6], endpoint: EndpointId, added: bool) {
        let _ = (mac, endpoint, added);
    }
}

/// The writer of one NIC's rules and endpoints.
pub struct Table {
    hasher: KeyHasher,
    base: Arc<BaseTable>,
    /// `DELTA_CHUNKS` chunks; key changes relative to `base`.
    delta: Vec<Arc<DeltaChunk>>,
    delta_len: usize,
    empty_chunk: Arc<DeltaChunk>,
    rule_count: usize,
    remote_only_count: usize,
    endpoint_rules: Vec<EndpointRules>,
    endpoints: Arc<Vec<Option<Arc<Endpoint>>>>,
    macs: Arc<MacMap>,
    generation: u64,
    current: Arc<ArcSwap<Snapshot>>,
    merger: Merger,
    observer: Option<Box<dyn RuleObserver>>,
    macs_refused: u64,
}

impl Default for Table {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a rule key has a remote address but no remote port.
fn is_remote_only(key: &FlowKey) -> bool {
    !key.remote_ip.is_unspecified() && key.remote_port == 0
}

/// `base` with `delta` applied.
fn merge(base: &BaseTable, delta: &[Arc<DeltaChunk>]) -> BaseTable {
    let hasher = *base.hasher();
    let mut len = base.len();
    for (k, v) in delta.iter().flat_map(|c| c.iter()) {
        match (v, base.find(k, hasher.hash(k)).is_some()) {
            (Some(_), false) => len += 1,
            (None, true) => len -= 1,
            _ => {}
        }
    }
    let slots = base.slot_count();
    if len * 2 <= slots && slots <= BaseTable::slots_for(len) * 4 {
        let mut merged = base.clone();
        // Removals first, so that the table never holds more than `len` rules (no growth).
        for (k, v) in delta.iter().flat_map(|c| c.iter()) {
            if v.is_none() {
                merged.remove(k);
            }
        }
        for (k, v) in delta.iter().flat_map(|c| c.iter()) {
            if let Some(e) = v {
                merged.insert(*k, *e);
            }
        }
        merged
    } else {
        let mut merged = BaseTable::with_slots(hasher, BaseTable::slots_for(len));
        for (k, e) in base.iter() {
            let h = hasher.hash(k);
            if delta[delta_chunk_of(h)].find(k, h).is_none() {
                merged.insert_new(*k, *e);
            }
        }
        for (k, v) in delta.iter().flat_map(|c| c.iter()) {
            if let Some(e) = v {
                merged.insert_new(*k, *e);
            }
        }
        merged
    }
}

fn merge_thread(jobs: mpsc::Receiver<MergeJob>, done: mpsc::Sender<BaseTable>) {
    while let Ok(job) = jobs.recv() {
        match job {
            MergeJob::Merge(base, delta) => {
                let merged = merge(&base, &delta);
                drop((base, delta));
                if done.send(merged).is_err() {
                    return;
                }
            }
            MergeJob::Free(base) => drop(base),
        }
    }
}

impl Table {
    /// An empty table with an empty published snapshot.
    pub fn new() -> Table {
        Self::with_merge_policy(MergePolicy::default())
    }

    /// An empty table that merges its delta layer as `policy` says.
    pub fn with_merge_policy(policy: MergePolicy) -> Table {
        let hasher = KeyHasher::random();
        let empty_chunk = Arc::new(DeltaChunk::empty(hasher));
        let table = Table {
            hasher,
            base: Arc::new(BaseTable::empty(hasher)),
            delta: vec![empty_chunk.clone(); DELTA_CHUNKS],
            delta_len: 0,
            empty_chunk,
            rule_count: 0,
            remote_only_count: 0,
            endpoint_rules: Vec::new(),
            endpoints: Arc::default(),
            macs: Arc::default(),
            generation: 0,
            current: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            merger: Merger {
                policy,
                thread: None,
                in_flight: None,
                retired: Vec::new(),
            },
            observer: None,
            macs_refused: 0,
        };
        table.current.store(Arc::new(table.build_snapshot()));
        table
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
        let endpoints = Arc::make_mut(&mut self.endpoints);
        let idx = endpoints
            .iter()
            .position(|e| e.is_none())
            .unwrap_or(endpoints.len());
        let id = EndpointId(idx as u32);
        let ep = Arc::new(Endpoint {
            id,
            kind,
            name,
            sink,
        });
        if idx == endpoints.len() {
            endpoints.push(Some(ep));
        } else {
            endpoints[idx] = Some(ep);
        }
        if self.endpoint_rules.len() <= idx {
            self.endpoint_rules
                .resize(idx + 1, EndpointRules::default());
        }
        self.endpoint_rules[idx] = EndpointRules::default();
        id
    }

    /// Removes an endpoint with all its rules and MACs; returns the number of rules removed.
    pub fn remove_endpoint(&mut self, id: EndpointId) -> usize {
        if self.endpoint(id).is_some() {
            Arc::make_mut(&mut self.endpoints)[id.index()] = None;
        }
        if self.macs.values().any(|e| *e == id) {
            let observer = &mut self.observer;
            Arc::make_mut(&mut self.macs).retain(|mac, e| {
                if *e != id {
                    return true;
                }
                if let Some(o) = observer.as_mut() {
                    o.mac_changed(mac, id, false);
                }
                false
            });
        }
        if self
            .endpoint_rules
            .get(id.index())
            .is_none_or(|c| c.rules == 0)
        {
            return 0;
        }
        let keys: Vec<FlowKey> = self
            .rules()
            .filter(|(_, r)| r.endpoint == id)
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.remove_existing(k);
        }
        keys.len()
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
        if self.rule(&key).is_some() {
            return Err(RuleError::Exists);
        }
        let entry = RuleEntry { endpoint, origin };
        self.set(key, Some(entry));
        self.account(&key, &entry, true);
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
        match self.rule(key) {
            None => Err(RuleError::NotFound),
            Some(r) if owner.is_some_and(|o| o != r.endpoint) => Err(RuleError::NotOwner),
            Some(_) => Ok(self.remove_existing(key)),
        }
    }

    /// Removes the learned rules of `endpoint` for which `keep` returns false; returns how
    /// many were removed. Static and client rules are never aged.
    pub fn age_learned(
        &mut self,
        endpoint: EndpointId,
        keep: &mut dyn FnMut(&FlowKey) -> bool,
    ) -> usize {
        if self
            .endpoint_rules
            .get(endpoint.index())
            .is_none_or(|c| c.learned == 0)
        {
            return 0;
        }
        let learned: Vec<FlowKey> = self
            .rules()
            .filter(|(_, r)| r.endpoint == endpoint && r.origin == Origin::Learned)
            .map(|(k, _)| *k)
            .collect();
        let mut removed = 0;
        for k in &learned {
            if !keep(k) {
                self.remove_existing(k);
                removed += 1;
            }
        }
        removed
    }

    /// The rule stored under exactly this key.
    pub fn rule(&self, key: &FlowKey) -> Option<RuleEntry> {
        let h = self.hasher.hash(key);
        match self.delta[delta_chunk_of(h)].find(key, h) {
            Some(v) => v,
            None => self.base.find(key, h),
        }
    }

    /// All rules (unordered).
    pub fn rules(&self) -> impl Iterator<Item = (&FlowKey, &RuleEntry)> {
        let check_delta = self.delta_len != 0;
        let base = self.base.iter().filter(move |(k, _)| {
            if !check_delta {
                return true;
            }
            let h = self.hasher.hash(k);
            self.delta[delta_chunk_of(h)].find(k, h).is_none()
        });
        let delta = self
            .delta
            .iter()
            .flat_map(|c| c.iter())
            .filter_map(|(k, v)| v.as_ref().map(|e| (k, e)));
        base.chain(delta)
    }

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// Installs `observer` (replacing any earlier one) and tells it of every rule there is
    /// now, as added; from then on it hears of each change.
    pub fn set_rule_observer(&mut self, mut observer: Box<dyn RuleObserver>) {
        for (key, entry) in self.rules() {
            observer.rule_changed(key, entry, true);
        }
        for (mac, endpoint) in self.macs.iter() {
            observer.mac_changed(mac, *endpoint, true);
        }
        self.observer = Some(observer);
    }

    /// Records that `mac` belongs to a local endpoint (frames sent to it are switched locally),
    /// taking it from any other endpoint that had it.
    pub fn add_mac(&mut self, mac: [u8; 6], endpoint: EndpointId) {
        if self.macs.get(&mac) == Some(&endpoint) {
            return;
        }
        let Some(idx) = self.endpoint(endpoint).map(|_| endpoint.index()) else {
            return;
        };
        if let Some(old) = Arc::make_mut(&mut self.macs).insert(mac, endpoint) {
            if let Some(c) = self.endpoint_rules.get_mut(old.index()) {
                c.macs = c.macs.saturating_sub(1);
            }
        }
        self.endpoint_rules[idx].macs += 1;
        if let Some(o) = self.observer.as_mut() {
            o.mac_changed(&mac, endpoint, true);
        }
    }

    /// Learns `mac` (a source MAC of a frame `endpoint` sent, no other endpoint's) unless the
    /// endpoint has [`MAX_LEARNED_MACS_PER_ENDPOINT`] already: then counts it as refused and
    /// returns `false`. A client that makes up source MACs cannot grow the switch's state.
    pub fn learn_mac(&mut self, mac: [u8; 6], endpoint: EndpointId) -> bool {
        match self.endpoint_rules.get(endpoint.index()) {
            Some(c) if self.endpoint(endpoint).is_some() => {
                if c.macs >= MAX_LEARNED_MACS_PER_ENDPOINT {
                    self.macs_refused += 1;
                    return false;
                }
            }
            _ => return false,
        }
        self.add_mac(mac, endpoint);
        true
    }

    /// Local MACs now.
    pub fn mac_count(&self) -> usize {
        self.macs.len()
    }

    /// Source MACs not learned so far (an endpoint had [`MAX_LEARNED_MACS_PER_ENDPOINT`]).
    pub fn macs_refused(&self) -> u64 {
        self.macs_refused
    }

    /// Makes every change since the last publish visible to all workers at once.
    pub fn publish(&mut self) {
        self.poll_merge(false);
        self.maybe_start_merge();
        self.generation += 1;
        let snapshot = Arc::new(self.build_snapshot());
        let old = self.current.swap(snapshot);
        drop(old);
        self.free_retired();
    }

    /// Number of keys in the delta layer (changes not yet merged into the base).
    pub fn delta_len(&self) -> usize {
        self.delta_len
    }

    /// Waits for a running background merge, then merges the whole delta into a new base on
    /// this thread. Visible to workers with the next [`Table::publish`].
    pub fn merge_now(&mut self) {
        self.poll_merge(true);
        if self.delta_len != 0 {
            let merged = merge(&self.base, &self.delta);
            self.install(merged, None);
        }
        self.free_retired();
    }

    fn build_snapshot(&self) -> Snapshot {
        Snapshot {
            generation: self.generation,
            base: self.base.clone(),
            delta: if self.delta_len == 0 {
                Vec::new()
            } else {
                self.delta.clone()
            },
            delta_len: self.delta_len,
            rule_count: self.rule_count,
            endpoints: self.endpoints.clone(),
            macs: self.macs.clone(),
            has_remote_ip_only: self.remote_only_count > 0,
        }
    }

    /// Removes a rule known to exist; returns it.
    fn remove_existing(&mut self, key: &FlowKey) -> RuleEntry {
        let entry = self.rule(key).expect("rule exists");
        self.set(*key, None);
        self.account(key, &entry, false);
        entry
    }

    /// Records in the delta that `key` now maps to `value` (`None`: no rule).
    fn set(&mut self, key: FlowKey, value: Option<RuleEntry>) {
        let h = self.hasher.hash(&key);
        let c = delta_chunk_of(h);
        // A key of the delta a running merge is applying must stay in the delta until the
        // merge is installed, or the new base would bring back its frozen state.
        let frozen = self
            .merger
            .in_flight
            .as_ref()
            .is_some_and(|f| f[c].find(&key, h).is_some());
        let same_as_base = !frozen && self.base.find(&key, h) == value;
        let chunk = Arc::make_mut(&mut self.delta[c]);
        let before = chunk.len();
        if same_as_base {
            chunk.remove(&key);
        } else {
            chunk.insert(key, value);
        }
        self.delta_len = self.delta_len + chunk.len() - before;
    }

    fn account(&mut self, key: &FlowKey, entry: &RuleEntry, added: bool) {
        let counts = &mut self.endpoint_rules[entry.endpoint.index()];
        let learned = usize::from(entry.origin == Origin::Learned);
        let remote_only = usize::from(is_remote_only(key));
        if added {
            self.rule_count += 1;
            self.remote_only_count += remote_only;
            counts.rules += 1;
            counts.learned += learned;
        } else {
            self.rule_count -= 1;
            self.remote_only_count -= remote_only;
            counts.rules -= 1;
            counts.learned -= learned;
        }
        if let Some(observer) = self.observer.as_mut() {
            observer.rule_changed(key, entry, added);
        }
    }

    fn merge_threshold(&self) -> usize {
        self.merger
            .policy
            .min_delta
            .max(self.base.len() / 64)
            .max(1)
    }

    fn maybe_start_merge(&mut self) {
        if self.merger.in_flight.is_some() || self.delta_len < self.merge_threshold() {
            return;
        }
        if self.merger.policy.background && self.start_thread() {
            let jobs = self
                .merger
                .thread
                .as_ref()
                .and_then(|t| t.jobs.as_ref())
                .expect("merge thread");
            if jobs
                .send(MergeJob::Merge(self.base.clone(), self.delta.clone()))
                .is_ok()
            {
                self.merger.in_flight = Some(self.delta.clone());
                return;
            }
            self.merge_thread_died();
        }
        let merged = merge(&self.base, &self.delta);
        self.install(merged, None);
    }

    /// Starts the merge thread unless it runs; whether it runs.
    fn start_thread(&mut self) -> bool {
        if self.merger.thread.is_some() {
            return true;
        }
        let (jobs_tx, jobs_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        match std::thread::Builder::new()
            .name("usnetd-table-merge".into())
            .spawn(move || merge_thread(jobs_rx, done_tx))
        {
            Ok(handle) => {
                self.merger.thread = Some(MergeThread {
                    jobs: Some(jobs_tx),
                    done: done_rx,
                    handle: Some(handle),
                });
                true
            }
            Err(e) => {
                log::warn!("rule table: cannot start the merge thread ({e}); merging inline");
                self.merger.policy.background = false;
                false
            }
        }
    }

    fn merge_thread_died(&mut self) {
        log::error!("rule table: the merge thread stopped; merging inline from now on");
        self.merger.thread = None;
        self.merger.in_flight = None;
        self.merger.policy.background = false;
    }

    /// Installs the result of a running merge (waiting for it with `wait`).
    fn poll_merge(&mut self, wait: bool) {
        if self.merger.in_flight.is_none() {
            return;
        }
        let result = match &self.merger.thread {
            None => Err(()),
            Some(t) if wait => t.done.recv().map_err(|_| ()),
            Some(t) => match t.done.try_recv() {
                Ok(merged) => Ok(merged),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => Err(()),
            },
        };
        match result {
            Ok(merged) => {
                let frozen = self.merger.in_flight.take();
                self.install(merged, frozen);
            }
            Err(()) => self.merge_thread_died(),
        }
    }

    /// Makes `merged` (the base with `frozen`, or the whole delta when `None`, applied) the
    /// base and keeps the delta entries that changed since.
    fn install(&mut self, merged: BaseTable, frozen: Option<Vec<Arc<DeltaChunk>>>) {
        let old = std::mem::replace(&mut self.base, Arc::new(merged));
        self.merger.retired.push(old);
        match frozen {
            None => self.delta.fill(self.empty_chunk.clone()),
            Some(frozen) => {
                for (chunk, frozen) in self.delta.iter_mut().zip(&frozen) {
                    if Arc::ptr_eq(chunk, frozen) {
                        *chunk = self.empty_chunk.clone();
                    } else if frozen.len() != 0 {
                        let mut kept = DeltaChunk::empty(self.hasher);
                        for (k, v) in chunk.iter() {
                            if frozen.find(k, self.hasher.hash(k)) != Some(*v) {
                                kept.insert(*k, *v);
                            }
                        }
                        *chunk = Arc::new(kept);
                    }
                }
            }
        }
        self.delta_len = self.delta.iter().map(|c| c.len()).sum();
    }

    /// Frees (on the merge thread, when it runs) the old bases no snapshot uses any more.
    fn free_retired(&mut self) {
        if self.merger.retired.is_empty() {
            return;
        }
        let (unused, used): (Vec<_>, Vec<_>) = std::mem::take(&mut self.merger.retired)
            .into_iter()
            .partition(|b| Arc::strong_count(b) == 1);
        self.merger.retired = used;
        let jobs = self.merger.thread.as_ref().and_then(|t| t.jobs.as_ref());
        for base in unused {
            if let Some(jobs) = jobs {
                // On failure the job (and the table) is dropped here: fine.
                let _ = jobs.send(MergeJob::Free(base));
            }
        }
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        if let Some(mut t) = self.merger.thread.take() {
            t.jobs = None;
            if let Some(h) = t.handle.take() {
                let _ = h.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{proto, Ip};

    struct NoSink;
    impl EndpointSink for NoSink {
        fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
            frames.len()
        }
    }

    fn conn(i: u32) -> FlowKey {
        let b = i.to_be_bytes();
        FlowKey {
            local_ip: Ip::v4([10, 0, 0, 2]),
            remote_ip: Ip::v4([10, b[1], b[2], b[3]]),
            local_port: 80,
            remote_port: 1000 + (i % 7) as u16,
            proto: proto::TCP,
        }
    }

    fn table(background: bool, min_delta: usize) -> (Table, EndpointId, EndpointId) {
        let mut t = Table::with_merge_policy(MergePolicy {
            min_delta,
            background,
        });
        let a = t.add_endpoint(EndpointKind::Kernel, "kernel".into(), Arc::new(NoSink));
        let b = t.add_endpoint(EndpointKind::Client, "client".into(), Arc::new(NoSink));
        (t, a, b)
    }

    /// Collects what a [`RuleObserver`] is told.
    struct Recorder(Arc<std::sync::Mutex<Vec<(FlowKey, EndpointId, bool)>>>);
    impl RuleObserver for Recorder {
        fn rule_changed(&mut self, key: &FlowKey, entry: &RuleEntry, added: bool) {
            self.0.lock().unwrap().push((*key, entry.endpoint, added));
        }
    }

    #[test]
    fn observer_hears_every_rule_change() {
        let (mut t, a, b) = table(true, 1);
        t.add_rule(conn(1).listening(), a, Origin::Static).unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        t.set_rule_observer(Box::new(Recorder(log.clone())));
        // Existing rules are replayed as added.
        assert_eq!(*log.lock().unwrap(), vec![(conn(1).listening(), a, true)]);
        assert!(t.learn(conn(2), a));
        assert!(!t.learn(conn(2), b), "refused: nothing to hear");
        t.add_rule(conn(3), b, Origin::Client).unwrap();
        t.publish();
        t.remove_rule(&conn(3), Some(b)).unwrap();
        assert_eq!(t.age_learned(a, &mut |_| false), 1);
        t.add_rule(conn(4), b, Origin::Client).unwrap();
        t.merge_now();
        t.publish();
        assert_eq!(t.remove_endpoint(b), 1);
        let got = log.lock().unwrap().clone();
        assert_eq!(
            got[1..],
            [
                (conn(2), a, true),
                (conn(3), b, true),
                (conn(3), b, false),
                (conn(2), a, false),
                (conn(4), b, true),
                (conn(4), b, false),
            ]
        );
    }

    /// A MAC change as a [`RuleObserver`] hears it.
    type MacChange = ([u8; 6], EndpointId, bool);

    /// Collects the MAC changes a [`RuleObserver`] is told.
    struct MacRecorder(Arc<std::sync::Mutex<Vec<MacChange>>>);
    impl RuleObserver for MacRecorder {
        fn rule_changed(&mut self, _: &FlowKey, _: &RuleEntry, _: bool) {}
        fn mac_changed(&mut self, mac: &[u8; 6], endpoint: EndpointId, added: bool) {
            self.0.lock().unwrap().push((*mac, endpoint, added));
        }
    }

    #[test]
    fn observer_hears_every_mac_change() {
        let (mut t, a, b) = table(false, 1024);
        let (m1, m2, m3) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
        t.add_mac(m1, a);
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        t.set_rule_observer(Box::new(MacRecorder(log.clone())));
        t.add_mac(m1, a); // no change: nothing to hear
        t.add_mac(m2, b);
        t.add_mac(m3, b);
        t.add_mac(m2, a); // moved to a
        t.remove_endpoint(b);
        t.publish();
        let mut got = log.lock().unwrap().clone();
        assert_eq!(
            got[..4],
            [(m1, a, true), (m2, b, true), (m3, b, true), (m2, a, true)]
        );
        got.drain(..4);
        assert_eq!(got, [(m3, b, false)], "only b's MACs go with b");
        let snap = t.reader().load();
        assert_eq!(snap.endpoint_by_mac(&m2), Some(a));
        assert_eq!(snap.endpoint_by_mac(&m3), None);
    }

    #[test]
    fn lookup_order_connection_remote_only_listening() {
        let (mut t, a, b) = table(false, 1024);
        let k = conn(1);
        t.add_rule(k.listening(), a, Origin::Static).unwrap();
        t.publish();
        assert_eq!(t.reader().load().lookup(&k), Some(a));
        t.add_rule(k.remote_ip_only(), b, Origin::Static).unwrap();
        t.publish();
        assert_eq!(t.reader().load().lookup(&k), Some(b));
        t.add_rule(k, a, Origin::Client).unwrap();
        t.publish();
        assert_eq!(t.reader().load().lookup(&k), Some(a));
        assert_eq!(t.reader().load().lookup(&conn(2)), Some(a), "listening");
        let other_port = FlowKey {
            local_port: 81,
            ..conn(2)
        };
        assert_eq!(t.reader().load().lookup(&other_port), None);
        assert_eq!(t.reader().load().generation(), 3);
    }

    #[test]
    fn add_learn_remove_and_owner_checks() {
        let (mut t, a, b) = table(false, 1024);
        let k = conn(5);
        assert!(t.learn(k, a));
        assert!(!t.learn(k, b), "first writer wins");
        assert_eq!(t.add_rule(k, b, Origin::Client), Err(RuleError::Exists));
        assert_eq!(
            t.add_rule(conn(6), EndpointId(9), Origin::Client),
            Err(RuleError::NoEndpoint)
        );
        assert_eq!(t.remove_rule(&k, Some(b)), Err(RuleError::NotOwner));
        assert_eq!(t.remove_rule(&conn(6), None), Err(RuleError::NotFound));
        assert_eq!(
            t.remove_rule(&k, Some(a)),
            Ok(RuleEntry {
                endpoint: a,
                origin: Origin::Learned
            })
        );
        assert_eq!(t.rule_count(), 0);
    }

    #[test]
    fn ageing_touches_only_learned_rules_of_the_endpoint() {
        let (mut t, a, b) = table(false, 4);
        for i in 0..20 {
            t.learn(conn(i), if i.is_multiple_of(2) { a } else { b });
        }
        t.add_rule(conn(100), a, Origin::Static).unwrap();
        t.publish();
        let removed = t.age_learned(a, &mut |k| k.remote_ip.0[15] < 10);
        assert_eq!(removed, 5);
        assert_eq!(t.rule_count(), 16);
        assert!(t.rule(&conn(100)).is_some());
        assert_eq!(t.remove_endpoint(a), 6);
        assert!(t.endpoint(a).is_none());
        assert_eq!(t.rules().count(), 10);
        assert!(t.rules().all(|(_, r)| r.endpoint == b));
        let c = t.add_endpoint(EndpointKind::Client, "again".into(), Arc::new(NoSink));
        assert_eq!(c, a, "the lowest free id is reused");
        assert_eq!(t.age_learned(c, &mut |_| false), 0);
    }

    #[test]
    fn macs_follow_their_endpoint() {
        let (mut t, a, b) = table(false, 1024);
        t.add_mac([2, 0, 0, 0, 0, 1], a);
        t.add_mac([2, 0, 0, 0, 0, 2], b);
        t.publish();
        let old = t.reader().load_full();
        t.remove_endpoint(a);
        t.publish();
        let snap = t.reader().load();
        assert_eq!(snap.endpoint_by_mac(&[2, 0, 0, 0, 0, 1]), None);
        assert_eq!(snap.endpoint_by_mac(&[2, 0, 0, 0, 0, 2]), Some(b));
        assert_eq!(old.endpoint_by_mac(&[2, 0, 0, 0, 0, 1]), Some(a));
        assert!(old.endpoint(a).is_some() && snap.endpoint(a).is_none());
    }

    #[test]
    fn learned_macs_are_bounded_per_endpoint() {
        let (mut t, a, b) = table(false, 1024);
        let mac = |i: usize| [2, 0, 0, 0, (i >> 8) as u8, i as u8];
        for i in 0..MAX_LEARNED_MACS_PER_ENDPOINT {
            assert!(t.learn_mac(mac(i), a), "MAC {i}");
        }
        assert!(!t.learn_mac(mac(1000), a), "one too many");
        assert!(!t.learn_mac(mac(1001), a));
        assert_eq!(t.macs_refused(), 2);
        // Other endpoints are not affected; static MACs are not bounded.
        assert!(t.learn_mac(mac(2000), b));
        t.add_mac(mac(3000), a);
        assert_eq!(t.mac_count(), MAX_LEARNED_MACS_PER_ENDPOINT + 2);
        // MACs taken by another endpoint free places (a has 16 learned + 1 static now).
        t.add_mac(mac(0), b);
        assert!(!t.learn_mac(mac(1002), a));
        t.add_mac(mac(1), b);
        assert!(t.learn_mac(mac(1002), a));
        assert!(!t.learn_mac(mac(1003), a));
        // Gone with the endpoint (b keeps its three).
        t.remove_endpoint(a);
        t.publish();
        assert_eq!(t.mac_count(), 3);
        assert!(!t.learn_mac(mac(4000), a), "no such endpoint");
        assert_eq!(t.reader().load().endpoint_by_mac(&mac(1000)), None);
    }

    fn check_all(t: &Table, n: u32, present: impl Fn(u32) -> bool) {
        let snap = t.reader().load_full();
        let keys: Vec<FlowKey> = (0..n).map(conn).collect();
        let mut out = vec![None; keys.len()];
        snap.lookup_batch(&keys, &mut out);
        for (i, k) in keys.iter().enumerate() {
            let want = present(i as u32).then_some(EndpointId(0));
            assert_eq!(snap.lookup(k), want, "key {i}");
            assert_eq!(out[i], want, "batch key {i}");
            assert_eq!(t.rule(k).map(|r| r.endpoint), want, "writer key {i}");
        }
        assert_eq!(snap.rule_count(), (0..n).filter(|i| present(*i)).count());
    }

    #[test]
    fn merges_keep_the_rules_inline_and_in_background() {
        for background in [false, true] {
            let (mut t, a, _) = table(background, 16);
            for i in 0..3000 {
                t.learn(conn(i), a);
                if i % 10 == 0 {
                    t.publish();
                }
            }
            t.publish();
            check_all(&t, 3100, |i| i < 3000);
            for i in (0..3000).step_by(2) {
                t.remove_rule(&conn(i), None).unwrap();
                t.publish();
            }
            check_all(&t, 3100, |i| i < 3000 && i % 2 == 1);
            t.merge_now();
            assert_eq!(t.delta_len(), 0);
            t.publish();
            check_all(&t, 3100, |i| i < 3000 && i % 2 == 1);
            // Re-adding a rule a running merge removes must survive the merge.
            for round in 0..50 {
                let k = conn(1 + 2 * round);
                t.remove_rule(&k, None).unwrap();
                t.publish();
                t.learn(k, a);
                t.publish();
            }
            t.merge_now();
            t.publish();
            check_all(&t, 3100, |i| i < 3000 && i % 2 == 1);
        }
    }

    #[test]
    fn old_snapshots_stay_unchanged() {
        let (mut t, a, b) = table(true, 8);
        for i in 0..100 {
            t.learn(conn(i), a);
        }
        t.publish();
        let old = t.reader().load_full();
        for i in 0..100 {
            t.remove_rule(&conn(i), None).unwrap();
            t.learn(conn(i), b);
            t.publish();
        }
        t.merge_now();
        t.publish();
        for i in 0..100 {
            assert_eq!(old.lookup(&conn(i)), Some(a));
            assert_eq!(t.reader().load().lookup(&conn(i)), Some(b));
        }
        assert_eq!(old.generation() + 101, t.reader().load().generation());
    }
}
