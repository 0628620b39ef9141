//! First-fragment decisions for later fragments: a small, bounded, expiring memory, one per
//! worker.
//!
//! Only the first fragment of a fragmented IP packet carries the L4 header (ports), so only it
//! can be matched on a rule. The worker remembers where it sent the first fragment under the
//! packet's [`FragKey`] (source, destination, protocol, IP id) and sends the later fragments
//! of the same packet there:
//!
//! - first fragment (`first && more`): look up the rule as usual, then [`FragTable::insert`];
//! - later fragment: [`FragTable::get`]; `None` is [`crate::counters::DropReason::FragmentWithoutFirst`]
//!   (the first was not seen, or its entry expired or was evicted);
//! - last fragment (`!more`): [`FragTable::remove`] after forwarding it. A middle fragment that
//!   is reordered behind the last one is then dropped; the sender's retransmission recovers.
//!
//! Bounds: the capacity is fixed by [`FragTable::new`], which allocates everything; nothing
//! allocates afterwards. Entries live for `ttl` ticks after their (last) insert. When the table
//! is full, [`FragTable::insert`] first drops expired entries, then evicts the *oldest* live
//! entry (counted in [`FragTable::evictions`]): a fragmented packet normally completes within
//! milliseconds, so the oldest entry is the one least likely to still be needed, and a new
//! packet is never refused.
//!
//! Time is passed in by the caller as a monotonic `u64` tick count (nanoseconds, or anything
//! else as long as `ttl` uses the same unit); the table never reads a clock, so it is
//! deterministic and testable.
//!
//! Buckets are indexed with std's randomly keyed SipHash, so an attacker cannot aim fragments
//! at one bucket chain; fragments are rare enough that its cost does not matter.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use crate::frame::Frame;
use crate::key::Ip;

/// Identifies the fragments of one IP packet (RFC 791 for IPv4, RFC 8200 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address.
    pub src: Ip,
    /// Destination address.
    pub dst: Ip,
    /// IP identification (16 bits for IPv4, 32 for IPv6).
    pub id: u32,
    /// The IP protocol for IPv4; always 0 for IPv6, whose fragments are identified by
    /// addresses and id only (and whose non-first fragments do not name the upper protocol).
    pub proto: u8,
}

impl FragKey {
    /// The key of a fragment (first or later); `None` for an unfragmented frame.
    #[inline]
    pub fn from_frame(frame: &Frame) -> Option<FragKey> {
        let info = frame.frag?;
        Some(FragKey {
            src: frame.src_ip,
            dst: frame.dst_ip,
            id: info.id,
            proto: if frame.src_ip.is_v4() { frame.proto } else { 0 },
        })
    }
}

/// What [`FragTable::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// A new entry took a free (or expired) place.
    Added,
    /// The key was present: its value and expiry were replaced.
    Replaced,
    /// The table was full of live entries: the oldest was evicted to make room.
    EvictedOldest,
}

/// The largest capacity [`FragTable::new`] accepts; larger requests are clamped to it.
pub const MAX_CAPACITY: usize = 1 << 24;

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Entry<V> {
    key: FragKey,
    value: V,
    /// First tick at which the entry is dead.
    expires: u64,
    /// Next entry in the same hash bucket, or in the free list.
    chain: u32,
    /// Neighbours in insertion order.
    older: u32,
    newer: u32,
}

/// A bounded, expiring map from [`FragKey`] to a small `Copy` value (the worker stores the
/// destination endpoint). See the module docs.
pub struct FragTable<V: Copy> {
    /// Grows by push up to `capacity` (reserved in `new`, so it never reallocates).
    entries: Vec<Entry<V>>,
    capacity: usize,
    /// Heads of the bucket chains; a power of two at least `capacity` long.
    buckets: Box<[u32]>,
    free: u32,
    oldest: u32,
    newest: u32,
    len: usize,
    ttl: u64,
    hasher: RandomState,
    evictions: u64,
    expirations: u64,
}

impl<V: Copy> FragTable<V> {
    /// A table for up to `capacity` packets (clamped to `1..=MAX_CAPACITY`), whose entries
    /// live for `ttl` ticks. Allocates all its memory now.
    pub fn new(capacity: usize, ttl: u64) -> FragTable<V> {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        FragTable {
            entries: Vec::with_capacity(capacity),
            capacity,
            buckets: vec![NIL; capacity.next_power_of_two()].into_boxed_slice(),
            free: NIL,
            oldest: NIL,
            newest: NIL,
            len: 0,
            ttl,
            hasher: RandomState::new(),
            evictions: 0,
            expirations: 0,
        }
    }

    /// The most entries the table holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held now, including expired ones not yet dropped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// How long entries live, in ticks.
    pub fn ttl(&self) -> u64 {
        self.ttl
    }

    /// Live entries evicted because the table was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Entries dropped because they expired.
    pub fn expirations(&self) -> u64 {
        self.expirations
    }

    /// Remembers `value` for `key` until `now + ttl`, replacing an entry with the same key.
    /// Never fails: a full table evicts its oldest entry (see the module docs).
    pub fn insert(&mut self, key: FragKey, value: V, now: u64) -> Inserted {
        self.expire(now);
        let expires = now.saturating_add(self.ttl);
        let bucket = self.bucket(&key);
        if let Some((idx, _)) = self.find(bucket, &key) {
            let e = &mut self.entries[idx as usize];
            e.value = value;
            e.expires = expires;
            self.unlink_order(idx);
            self.link_newest(idx);
            return Inserted::Replaced;
        }
        let mut outcome = Inserted::Added;
        if self.len == self.capacity {
            self.remove_index(self.oldest);
            self.evictions += 1;
            outcome = Inserted::EvictedOldest;
        }
        let entry = Entry {
            key,
            value,
            expires,
            chain: self.buckets[bucket],
            older: NIL,
            newer: NIL,
        };
        let idx = if self.free != NIL {
            let idx = self.free;
            self.free = self.entries[idx as usize].chain;
            self.entries[idx as usize] = entry;
            idx
        } else {
            // len < capacity and the free list is empty, so entries.len() < capacity: the push
            // stays within the capacity reserved in `new`.
            self.entries.push(entry);
            (self.entries.len() - 1) as u32
        };
        self.buckets[bucket] = idx;
        self.link_newest(idx);
        self.len += 1;
        outcome
    }

    /// The value remembered for `key`, if it has not expired at `now`.
    #[inline]
    pub fn get(&self, key: &FragKey, now: u64) -> Option<V> {
        let (idx, _) = self.find(self.bucket(key), key)?;
        let e = &self.entries[idx as usize];
        (now < e.expires).then_some(e.value)
    }

    /// Forgets `key` (after the last fragment); returns its value if it was present (expired
    /// or not).
    pub fn remove(&mut self, key: &FragKey) -> Option<V> {
        let (idx, _) = self.find(self.bucket(key), key)?;
        let value = self.entries[idx as usize].value;
        self.remove_index(idx);
        Some(value)
    }

    /// Drops the entries that have expired at `now`, oldest first. [`FragTable::insert`] does
    /// this itself; a worker may also call it when idle.
    pub fn expire(&mut self, now: u64) {
        while self.oldest != NIL && self.entries[self.oldest as usize].expires <= now {
            self.remove_index(self.oldest);
            self.expirations += 1;
        }
    }

    #[inline]
    fn bucket(&self, key: &FragKey) -> usize {
        (self.hasher.hash_one(key) as usize) & (self.buckets.len() - 1)
    }

    /// The entry holding `key` in `bucket`, and its predecessor in the chain.
    fn find(&self, bucket: usize, key: &FragKey) -> Option<(u32, u32)> {
        let mut prev = NIL;
        let mut idx = self.buckets[bucket];
        while idx != NIL {
            let e = &self.entries[idx as usize];
            if e.key == *key {
                return Some((idx, prev));
            }
            prev = idx;
            idx = e.chain;
        }
        None
    }

    /// Unlinks a live entry from its bucket and the insertion order, onto the free list.
    fn remove_index(&mut self, idx: u32) {
        let key = self.entries[idx as usize].key;
        let bucket = self.bucket(&key);
        if let Some((found, prev)) = self.find(bucket, &key) {
            debug_assert_eq!(found, idx);
            let next = self.entries[idx as usize].chain;
            if prev == NIL {
                self.buckets[bucket] = next;
            } else {
                self.entries[prev as usize].chain = next;
            }
        }
        self.unlink_order(idx);
        self.entries[idx as usize].chain = self.free;
        self.free = idx;
        self.len -= 1;
    }

    fn unlink_order(&mut self, idx: u32) {
        let Entry { older, newer, .. } = self.entries[idx as usize];
        if older == NIL {
            self.oldest = newer;
        } else {
            self.entries[older as usize].newer = newer;
        }
        if newer == NIL {
            self.newest = older;
        } else {
            self.entries[newer as usize].older = older;
        }
    }

    fn link_newest(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        e.older = self.newest;
        e.newer = NIL;
        if self.newest == NIL {
            self.oldest = idx;
        } else {
            self.entries[self.newest as usize].newer = idx;
        }
        self.newest = idx;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: u32) -> FragKey {
        FragKey {
            src: Ip::v4([10, 0, 0, 1]),
            dst: Ip::v4([10, 0, 0, 2]),
            id,
            proto: 17,
        }
    }

    #[test]
    fn never_allocates_after_new() {
        let mut t = FragTable::<u32>::new(16, 100);
        let (cap, ptr) = (t.entries.capacity(), t.entries.as_ptr());
        for i in 0..1000u32 {
            t.insert(key(i), i, u64::from(i));
            if i % 3 == 0 {
                t.remove(&key(i));
            }
            assert!(t.len() <= 16);
            assert_eq!(t.entries.capacity(), cap);
            assert_eq!(t.entries.as_ptr(), ptr);
        }
        assert!(t.entries.len() <= 16);
    }

    #[test]
    fn chains_and_order_stay_consistent() {
        // Capacity 1 has a single bucket: every key shares one chain.
        let mut t = FragTable::<u32>::new(1, 10);
        assert_eq!(t.insert(key(1), 1, 0), Inserted::Added);
        assert_eq!(t.insert(key(2), 2, 1), Inserted::EvictedOldest);
        assert_eq!(t.get(&key(1), 1), None);
        assert_eq!(t.get(&key(2), 1), Some(2));
        let mut t = FragTable::<u32>::new(4, 10);
        for i in 0..4 {
            t.insert(key(i), i, 0);
        }
        assert_eq!(t.remove(&key(1)), Some(1));
        assert_eq!(t.remove(&key(1)), None);
        for i in [0, 2, 3] {
            assert_eq!(t.get(&key(i), 0), Some(i));
        }
        // Walk the order list both ways.
        let mut seen = 0;
        let mut idx = t.oldest;
        while idx != NIL {
            seen += 1;
            idx = t.entries[idx as usize].newer;
        }
        assert_eq!(seen, 3);
        seen = 0;
        idx = t.newest;
        while idx != NIL {
            seen += 1;
            idx = t.entries[idx as usize].older;
        }
        assert_eq!(seen, 3);
    }
}
