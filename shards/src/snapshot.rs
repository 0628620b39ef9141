//! Immutable rule snapshots: what the workers read, lock-free, through `arc-swap`.
//!
//! # Layout: a large immutable base plus a small chunked delta
//!
//! A snapshot's rules are two layers of open-addressing hash tables (`FlatTable`: one flat
//! array of 48-byte slots, linear probing, a 16-bit hash tag per slot, no pointers):
//!
//! - the **base**, an `Arc` shared by many snapshots, holds (almost) all rules. It is never
//!   changed once built; a new base is built by merging the delta into a copy of the old one,
//!   on the table's background merge thread (see [`crate::table`]), so a publish never copies
//!   it.
//! - the **delta** holds the latest state of every key changed since the base was built: the
//!   rule (`Some`) or a tombstone (`None`, the rule was removed). It is split into
//!   `DELTA_CHUNKS` (64) small tables by hash bits, each behind its own `Arc`: the writer changes
//!   chunks copy-on-write, so publishing one change costs one small chunk copy plus 64
//!   reference counts, whatever the table size.
//!
//! A lookup hashes the key once, probes the delta chunk (only while the delta is not empty;
//! it is small and stays in cache) and then the base. [`Snapshot::lookup_batch`] hashes a
//! whole batch first and touches every key's home slot in a first pass of independent loads
//! (the crate forbids `unsafe`, so no prefetch intrinsic), so that the cache misses of a large
//! table overlap instead of queueing one after the other.
//!
//! Endpoints and the MAC map are small; they are shared between snapshots behind `Arc`s and
//! copied by the writer only when they change.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
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

/// Number of independently copied chunks of the delta layer.
pub(crate) const DELTA_CHUNKS: usize = 64;

/// Base tables at least this large (in slots) are touched in a first pass by
/// [`Snapshot::lookup_batch`]; smaller ones are in cache anyway.
const TOUCH_MIN_SLOTS: usize = 1 << 15;

/// Keys hashed and touched together by [`Snapshot::lookup_batch`] (one frame batch).
const MAX_BATCH_CHUNK: usize = 64;

#[inline(always)]
fn folded_multiply(a: u64, b: u64) -> u64 {
    let p = u128::from(a) * u128::from(b);
    (p as u64) ^ ((p >> 64) as u64)
}

#[inline(always)]
fn word(b: &[u8; 16], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A fast keyed hash of [`FlowKey`]s (folded multiplies, foldhash style), seeded per table so
/// that remote hosts cannot aim for collisions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyHasher {
    seeds: [u64; 7],
}

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher {
            seeds: [
                0x243f_6a88_85a3_08d3,
                0x1319_8a2e_0370_7344,
                0xa409_3822_299f_31d0,
                0x082e_fa98_ec4e_6c89,
                0x4528_21e6_38d0_1377,
                0xbe54_66cf_34e9_0c6c,
                0xc0ac_29b7_c97c_50dd,
            ],
        }
    }
}

impl KeyHasher {
    /// A hasher with random seeds.
    pub(crate) fn random() -> KeyHasher {
        use std::hash::BuildHasher;
        let state = std::collections::hash_map::RandomState::new();
        let mut seeds = [0u64; 7];
        for (i, s) in seeds.iter_mut().enumerate() {
            *s = state.hash_one(i as u64);
        }
        KeyHasher { seeds }
    }

    /// The hash of a key.
    #[inline(always)]
    pub(crate) fn hash(&self, k: &FlowKey) -> u64 {
        let s = &self.seeds;
        let tail =
            u64::from(k.local_port) | (u64::from(k.remote_port) << 16) | (u64::from(k.proto) << 32);
        let a = folded_multiply(word(&k.local_ip.0, 0) ^ s[0], word(&k.local_ip.0, 8) ^ s[1]);
        let b = folded_multiply(
            word(&k.remote_ip.0, 0) ^ s[2],
            word(&k.remote_ip.0, 8) ^ s[3],
        );
        let c = folded_multiply(tail ^ s[4], a ^ b.rotate_left(29) ^ s[5]);
        folded_multiply(c ^ s[6], 0x9e37_79b9_7f4a_7c15)
    }
}

/// One slot of a [`FlatTable`]: 48 bytes for the rule tables.
#[derive(Clone, Copy)]
#[repr(C)]
pub(crate) struct Slot<V> {
    key: FlowKey,
    tag: u16,
    /// `None`: the slot is free.
    value: Option<V>,
}

#[inline(always)]
fn tag_of(hash: u64) -> u16 {
    (hash >> 48) as u16
}

/// An open-addressing hash table from [`FlowKey`] to `V` in one flat array: linear probing,
/// backward-shift deletion (no tombstones), load at most one half.
#[derive(Clone)]
pub(crate) struct FlatTable<V: Copy> {
    slots: Box<[Slot<V>]>,
    mask: usize,
    len: usize,
    hasher: KeyHasher,
}

impl<V: Copy> FlatTable<V> {
    /// An empty table with room for `capacity` slots (rounded up to a power of two).
    pub(crate) fn with_slots(hasher: KeyHasher, capacity: usize) -> Self {
        let cap = capacity.max(1).next_power_of_two();
        FlatTable {
            slots: vec![
                Slot {
                    key: FlowKey::default(),
                    tag: 0,
                    value: None,
                };
                cap
            ]
            .into_boxed_slice(),
            mask: cap - 1,
            len: 0,
            hasher,
        }
    }

    /// An empty table with one (free) slot.
    pub(crate) fn empty(hasher: KeyHasher) -> Self {
        Self::with_slots(hasher, 1)
    }

    /// The number of slots this table gets for `len` entries (load between 1/4 and 1/2).
    pub(crate) fn slots_for(len: usize) -> usize {
        (len * 2).max(8).next_power_of_two()
    }

    /// The hasher of this table.
    #[inline(always)]
    pub(crate) fn hasher(&self) -> &KeyHasher {
        &self.hasher
    }

    /// Number of entries.
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of slots.
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The value stored under `key` (whose hash is `hash`).
    #[inline(always)]
    pub(crate) fn find(&self, key: &FlowKey, hash: u64) -> Option<V> {
        let tag = tag_of(hash);
        let mut i = hash as usize & self.mask;
        loop {
            let s = &self.slots[i];
            match s.value {
                None => return None,
                Some(v) if s.tag == tag && s.key == *key => return Some(v),
                Some(_) => i = (i + 1) & self.mask,
            }
        }
    }

    /// Reads the start and the end of the home slot of `hash`, so that a later `find` finds
    /// it in cache; returns something of what it read, for `black_box`.
    #[inline(always)]
    fn touch(&self, hash: u64) -> u64 {
        let s = &self.slots[hash as usize & self.mask];
        u64::from(s.key.local_ip.0[0]) ^ u64::from(s.tag)
    }

    fn index_of(&self, key: &FlowKey, hash: u64) -> Result<usize, usize> {
        let tag = tag_of(hash);
        let mut i = hash as usize & self.mask;
        loop {
            let s = &self.slots[i];
            match s.value {
                None => return Err(i),
                Some(_) if s.tag == tag && s.key == *key => return Ok(i),
                Some(_) => i = (i + 1) & self.mask,
            }
        }
    }

    /// Inserts or replaces; returns the old value. Grows to keep the load at most one half.
    pub(crate) fn insert(&mut self, key: FlowKey, value: V) -> Option<V> {
        let hash = self.hasher.hash(&key);
        self.insert_hashed(key, hash, value)
    }

    fn insert_hashed(&mut self, key: FlowKey, hash: u64, value: V) -> Option<V> {
        match self.index_of(&key, hash) {
            Ok(i) => self.slots[i].value.replace(value),
            Err(i) => {
                if (self.len + 1) * 2 > self.slots.len() {
                    self.resize(Self::slots_for(self.len + 1));
                    return self.insert_hashed(key, hash, value);
                }
                self.slots[i] = Slot {
                    key,
                    tag: tag_of(hash),
                    value: Some(value),
                };
                self.len += 1;
                None
            }
        }
    }

    /// Inserts a key known to be absent, without growing (the caller sized the table).
    pub(crate) fn insert_new(&mut self, key: FlowKey, value: V) {
        let hash = self.hasher.hash(&key);
        let mut i = hash as usize & self.mask;
        while self.slots[i].value.is_some() {
            i = (i + 1) & self.mask;
        }
        self.slots[i] = Slot {
            key,
            tag: tag_of(hash),
            value: Some(value),
        };
        self.len += 1;
    }

    fn resize(&mut self, slots: usize) {
        let mut bigger = Self::with_slots(self.hasher, slots);
        for (k, v) in self.iter() {
            bigger.insert_new(*k, *v);
        }
        *self = bigger;
    }

    /// Removes `key`; returns its value.
    pub(crate) fn remove(&mut self, key: &FlowKey) -> Option<V> {
        let hash = self.hasher.hash(key);
        let mut hole = self.index_of(key, hash).ok()?;
        let old = self.slots[hole].value.take();
        self.len -= 1;
        // Backward-shift deletion: move later entries of the run into the hole when their
        // home slot is not after the hole.
        let mut j = hole;
        loop {
            j = (j + 1) & self.mask;
            if self.slots[j].value.is_none() {
                break;
            }
            let home = self.hasher.hash(&self.slots[j].key) as usize & self.mask;
            if (j.wrapping_sub(home) & self.mask) >= (j.wrapping_sub(hole) & self.mask) {
                self.slots[hole] = self.slots[j];
                self.slots[j].value = None;
                hole = j;
            }
        }
        old
    }

    /// All entries, in slot order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&FlowKey, &V)> {
        self.slots
            .iter()
            .filter_map(|s| s.value.as_ref().map(|v| (&s.key, v)))
    }
}

/// Rules of the base layer.
pub(crate) type BaseTable = FlatTable<RuleEntry>;
/// One chunk of the delta layer: `Some(rule)` added or changed, `None` removed.
pub(crate) type DeltaChunk = FlatTable<Option<RuleEntry>>;

/// The delta chunk a key hash belongs to.
#[inline(always)]
pub(crate) fn delta_chunk_of(hash: u64) -> usize {
    (hash >> 32) as usize % DELTA_CHUNKS
}

/// A small, fast (FxHash-style) hasher for MAC addresses.
#[derive(Default, Clone, Copy)]
pub(crate) struct MacHasher(u64);

impl Hasher for MacHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// MAC address -> local endpoint.
pub(crate) type MacMap = HashMap<[u8; 6], EndpointId, BuildHasherDefault<MacHasher>>;

/// One immutable view of a NIC's rules and endpoints.
pub struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) base: Arc<BaseTable>,
    /// [`DELTA_CHUNKS`] chunks, or empty when `delta_len` is 0.
    pub(crate) delta: Vec<Arc<DeltaChunk>>,
    pub(crate) delta_len: usize,
    pub(crate) rule_count: usize,
    pub(crate) endpoints: Arc<Vec<Option<Arc<Endpoint>>>>,
    pub(crate) macs: Arc<MacMap>,
    pub(crate) has_remote_ip_only: bool,
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot {
            generation: 0,
            base: Arc::new(BaseTable::empty(KeyHasher::default())),
            delta: Vec::new(),
            delta_len: 0,
            rule_count: 0,
            endpoints: Arc::default(),
            macs: Arc::default(),
            has_remote_ip_only: false,
        }
    }
}

impl Snapshot {
    /// The rule under exactly `key` (with hash `hash`): delta first, then base.
    #[inline(always)]
    fn get(&self, key: &FlowKey, hash: u64) -> Option<RuleEntry> {
        if self.delta_len != 0 {
            if let Some(v) = self.delta[delta_chunk_of(hash)].find(key, hash) {
                return v;
            }
        }
        self.base.find(key, hash)
    }

    /// The lookup order after the exact key missed.
    #[inline]
    fn lookup_wildcards(&self, key: &FlowKey) -> Option<EndpointId> {
        let h = self.base.hasher();
        if self.has_remote_ip_only && key.remote_port != 0 {
            let k = key.remote_ip_only();
            if let Some(e) = self.get(&k, h.hash(&k)) {
                return Some(e.endpoint);
            }
        }
        if key.is_listening() {
            return None;
        }
        let k = key.listening();
        self.get(&k, h.hash(&k)).map(|e| e.endpoint)
    }

    /// Finds the endpoint for a frame's key: the connection rule (exact 5-tuple) first, then a
    /// rule with the remote address but no remote port, then the listening rule.
    #[inline]
    pub fn lookup(&self, key: &FlowKey) -> Option<EndpointId> {
        match self.get(key, self.base.hasher().hash(key)) {
            Some(e) => Some(e.endpoint),
            None => self.lookup_wildcards(key),
        }
    }

    /// Looks up a batch of keys (`out[i]` for `keys[i]`); faster than one by one on large
    /// tables. `out` must be at least as long as `keys`.
    pub fn lookup_batch(&self, keys: &[FlowKey], out: &mut [Option<EndpointId>]) {
        let n = keys.len().min(out.len());
        for (keys, out) in keys[..n]
            .chunks(MAX_BATCH_CHUNK)
            .zip(out[..n].chunks_mut(MAX_BATCH_CHUNK))
        {
            self.lookup_chunk(keys, out);
        }
    }

    #[inline]
    fn lookup_chunk(&self, keys: &[FlowKey], out: &mut [Option<EndpointId>]) {
        let mut hashes = [0u64; MAX_BATCH_CHUNK];
        let hasher = self.base.hasher();
        for (h, k) in hashes.iter_mut().zip(keys) {
            *h = hasher.hash(k);
        }
        if self.base.slot_count() >= TOUCH_MIN_SLOTS {
            // Independent loads of every home slot: their cache misses overlap.
            let mut touched = 0u64;
            for h in &hashes[..keys.len()] {
                touched ^= self.base.touch(*h);
            }
            std::hint::black_box(touched);
        }
        for ((o, k), h) in out.iter_mut().zip(keys).zip(&hashes) {
            *o = match self.get(k, *h) {
                Some(e) => Some(e.endpoint),
                None => self.lookup_wildcards(k),
            };
        }
    }

    /// The rule stored under exactly this key, if any.
    #[inline]
    pub fn rule(&self, key: &FlowKey) -> Option<RuleEntry> {
        self.get(key, self.base.hasher().hash(key))
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
        self.rule_count
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{proto, Ip};

    fn key(i: u32) -> FlowKey {
        let b = i.to_be_bytes();
        FlowKey {
            local_ip: Ip::v4([10, 0, 0, 2]),
            remote_ip: Ip::v4([10, b[1], b[2], b[3]]),
            local_port: 80,
            remote_port: 1024 + (i % 50_000) as u16,
            proto: proto::TCP,
        }
    }

    #[test]
    fn slot_is_48_bytes() {
        assert_eq!(std::mem::size_of::<Slot<RuleEntry>>(), 48);
        assert_eq!(std::mem::size_of::<Slot<Option<RuleEntry>>>(), 48);
    }

    #[test]
    fn flat_table_insert_find_remove() {
        let mut t: FlatTable<u32> = FlatTable::empty(KeyHasher::default());
        for i in 0..5000 {
            assert_eq!(t.insert(key(i), i), None);
        }
        assert_eq!(t.len(), 5000);
        assert!(t.slot_count() >= 10_000);
        for i in 0..5000 {
            let k = key(i);
            assert_eq!(t.find(&k, t.hasher().hash(&k)), Some(i));
        }
        assert_eq!(t.insert(key(7), 70), Some(7));
        for i in (0..5000).step_by(3) {
            assert!(t.remove(&key(i)).is_some());
        }
        assert_eq!(t.remove(&key(0)), None);
        for i in 0..5000 {
            let k = key(i);
            let want = if i % 3 == 0 {
                None
            } else if i == 7 {
                Some(70)
            } else {
                Some(i)
            };
            assert_eq!(t.find(&k, t.hasher().hash(&k)), want, "key {i}");
        }
        assert_eq!(t.iter().count(), t.len());
    }

    #[test]
    fn probe_runs_stay_short() {
        // A bad hash shows up as long runs of occupied slots.
        let mut t: FlatTable<u32> = FlatTable::with_slots(KeyHasher::default(), 1 << 17);
        for i in 0..(1 << 16) {
            t.insert_new(key(i), i);
        }
        let (mut run, mut longest) = (0, 0);
        for s in t.slots.iter() {
            run = if s.value.is_some() { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        assert!(longest < 100, "longest run {longest}");
    }

    #[test]
    fn mac_hasher_distinguishes() {
        let mut m = MacMap::default();
        m.insert([2, 0, 0, 0, 0, 1], EndpointId(1));
        m.insert([2, 0, 0, 0, 0, 2], EndpointId(2));
        assert_eq!(m.get(&[2, 0, 0, 0, 0, 1]), Some(&EndpointId(1)));
        assert_eq!(m.get(&[2, 0, 0, 0, 0, 3]), None);
    }
}
