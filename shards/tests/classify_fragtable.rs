//! The fragment table: keys from classified fragments, capacity bound, expiry, eviction, and
//! a model-based property test against a plain list.

mod classify_util;

use classify_util::*;
use proptest::prelude::*;
use usnetd_shards::frag::{FragKey, FragTable, Inserted};
use usnetd_shards::frame::classify;
use usnetd_shards::key::Ip;

fn key(id: u32) -> FragKey {
    FragKey {
        src: Ip::v4([192, 0, 2, 1]),
        dst: Ip::v4([192, 0, 2, 2]),
        id,
        proto: UDP,
    }
}

#[test]
fn keys_of_first_and_later_fragments_match() {
    let (a, b) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let first = Spec::v4(a, b, UDP, 1, 2).v4_fragment(42, 0, true);
    let later = Spec::v4(a, b, UDP, 1, 2).v4_fragment(42, 100, false);
    let first = classify(&first.build()).unwrap();
    let later = classify(&later.build()).unwrap();
    let k = FragKey::from_frame(&first).unwrap();
    assert_eq!(Some(k), FragKey::from_frame(&later));
    assert_eq!(
        (k.id, k.proto, k.src, k.dst),
        (42, UDP, Ip::v4(a), Ip::v4(b))
    );
    // Another protocol or id is another packet.
    let other = Spec::v4(a, b, TCP, 1, 2).v4_fragment(42, 100, false);
    let other = classify(&other.build()).unwrap();
    assert_ne!(FragKey::from_frame(&other), Some(k));
    // Unfragmented: no key.
    let whole = classify(&Spec::v4(a, b, UDP, 1, 2).build()).unwrap();
    assert_eq!(FragKey::from_frame(&whole), None);

    // IPv6: a later fragment names the header after the fragment header, not the upper
    // protocol, so the key leaves the protocol out.
    let frag = |offset, more| Ext::Fragment {
        offset,
        more,
        id: 7,
    };
    let first =
        Spec::v6(v6addr(1), v6addr(2), TCP, 1, 2).v6_exts(&[frag(0, true), Ext::DestOpts(0)]);
    let later =
        Spec::v6(v6addr(1), v6addr(2), TCP, 1, 2).v6_exts(&[frag(9, false), Ext::DestOpts(0)]);
    let first = classify(&first.build()).unwrap();
    let later = classify(&later.build()).unwrap();
    assert_ne!(first.proto, later.proto);
    assert_eq!(FragKey::from_frame(&first), FragKey::from_frame(&later));
    assert_eq!(FragKey::from_frame(&first).unwrap().id, 7);
}

#[test]
fn capacity_is_a_hard_bound_and_the_oldest_is_evicted() {
    let mut t = FragTable::<u32>::new(8, 1_000);
    assert_eq!(t.capacity(), 8);
    for i in 0..24u32 {
        let outcome = t.insert(key(i), i, u64::from(i));
        assert_eq!(
            outcome,
            if i < 8 {
                Inserted::Added
            } else {
                Inserted::EvictedOldest
            }
        );
        assert!(t.len() <= 8);
    }
    assert_eq!(t.len(), 8);
    assert_eq!(t.evictions(), 16);
    for i in 0..16 {
        assert_eq!(t.get(&key(i), 30), None, "{i} was evicted");
    }
    for i in 16..24 {
        assert_eq!(t.get(&key(i), 30), Some(i));
    }
}

#[test]
fn entries_expire_after_ttl() {
    let mut t = FragTable::<u32>::new(4, 100);
    t.insert(key(1), 10, 1_000);
    assert_eq!(t.get(&key(1), 1_000), Some(10));
    assert_eq!(t.get(&key(1), 1_099), Some(10));
    assert_eq!(t.get(&key(1), 1_100), None);
    // Re-inserting refreshes the expiry and the value.
    assert_eq!(t.insert(key(1), 11, 1_050), Inserted::Replaced);
    assert_eq!(t.get(&key(1), 1_149), Some(11));
    // An insert drops expired entries, which then do not count as evictions.
    t.insert(key(2), 20, 1_100);
    t.insert(key(3), 30, 1_200);
    assert_eq!(t.len(), 1, "key 1 expired at 1150, key 2 at 1200");
    assert_eq!(t.expirations(), 2);
    assert_eq!(t.evictions(), 0);
    t.expire(10_000);
    assert!(t.is_empty());
}

#[test]
fn remove_frees_the_place() {
    let mut t = FragTable::<u32>::new(2, 100);
    t.insert(key(1), 1, 0);
    t.insert(key(2), 2, 0);
    assert_eq!(t.remove(&key(1)), Some(1));
    assert_eq!(t.remove(&key(1)), None);
    assert_eq!(t.insert(key(3), 3, 0), Inserted::Added);
    assert_eq!(t.evictions(), 0);
    assert_eq!((t.get(&key(2), 0), t.get(&key(3), 0)), (Some(2), Some(3)));
}

#[test]
fn degenerate_parameters() {
    let mut t = FragTable::<u8>::new(0, 5);
    assert_eq!(t.capacity(), 1);
    t.insert(key(1), 1, 0);
    assert_eq!(t.get(&key(1), 4), Some(1));
    let mut never = FragTable::<u8>::new(4, 0);
    never.insert(key(1), 1, 0);
    assert_eq!(never.get(&key(1), 0), None);
    let mut forever = FragTable::<u8>::new(4, u64::MAX);
    forever.insert(key(1), 1, u64::MAX - 1);
    assert_eq!(forever.get(&key(1), u64::MAX - 1), Some(1));
}

/// The reference model: a list in insertion (= expiry, with a fixed ttl) order.
struct Model {
    entries: Vec<(u32, u32, u64)>,
    capacity: usize,
    ttl: u64,
    evictions: u64,
    expirations: u64,
}

impl Model {
    fn insert(&mut self, k: u32, v: u32, now: u64) -> Inserted {
        let before = self.entries.len();
        self.entries.retain(|e| e.2 > now);
        self.expirations += (before - self.entries.len()) as u64;
        let expires = now.saturating_add(self.ttl);
        if let Some(at) = self.entries.iter().position(|e| e.0 == k) {
            self.entries.remove(at);
            self.entries.push((k, v, expires));
            return Inserted::Replaced;
        }
        let mut outcome = Inserted::Added;
        if self.entries.len() == self.capacity {
            self.entries.remove(0);
            self.evictions += 1;
            outcome = Inserted::EvictedOldest;
        }
        self.entries.push((k, v, expires));
        outcome
    }

    fn get(&self, k: u32, now: u64) -> Option<u32> {
        self.entries
            .iter()
            .find(|e| e.0 == k && now < e.2)
            .map(|e| e.1)
    }

    fn remove(&mut self, k: u32) -> Option<u32> {
        let at = self.entries.iter().position(|e| e.0 == k)?;
        Some(self.entries.remove(at).1)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert(u32, u32),
    Get(u32),
    Remove(u32),
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u32..24, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
        3 => (0u32..24).prop_map(Op::Get),
        1 => (0u32..24).prop_map(Op::Remove),
        2 => (0u64..40).prop_map(Op::Tick),
    ]
}

proptest! {
    #[test]
    fn behaves_like_the_model(
        capacity in 1usize..10,
        ttl in 1u64..60,
        ops in prop::collection::vec(op(), 1..300),
    ) {
        let mut table = FragTable::<u32>::new(capacity, ttl);
        let mut model = Model { entries: Vec::new(), capacity, ttl, evictions: 0, expirations: 0 };
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Insert(k, v) => {
                    prop_assert_eq!(table.insert(key(k), v, now), model.insert(k, v, now));
                }
                Op::Get(k) => prop_assert_eq!(table.get(&key(k), now), model.get(k, now)),
                Op::Remove(k) => prop_assert_eq!(table.remove(&key(k)), model.remove(k)),
                Op::Tick(d) => now += d,
            }
            prop_assert!(table.len() <= capacity);
            prop_assert_eq!(table.len(), model.entries.len());
            prop_assert_eq!(table.evictions(), model.evictions);
            prop_assert_eq!(table.expirations(), model.expirations);
        }
    }
}
