//! Model test: random operation sequences on a [`Table`] and on a plain reference model
//! (a `BTreeMap` with the lookup order written out); after every publish the snapshot must
//! agree with the model, and snapshots held by readers must never change.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use usnetd_shards::endpoint::{EndpointId, EndpointKind, EndpointSink};
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::snapshot::{Origin, RuleEntry, Snapshot};
use usnetd_shards::table::{MergePolicy, RuleError, Table};

struct NoSink;
impl EndpointSink for NoSink {
    fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
        frames.len()
    }
}

/// The reference: rules in a BTreeMap, endpoints as a list of live ids.
#[derive(Clone, Default)]
struct Model {
    rules: BTreeMap<FlowKey, RuleEntry>,
    endpoints: Vec<bool>,
    macs: BTreeMap<[u8; 6], EndpointId>,
}

impl Model {
    fn lookup(&self, k: &FlowKey) -> Option<EndpointId> {
        let remote_only = FlowKey {
            remote_port: 0,
            ..*k
        };
        let listening = FlowKey {
            remote_ip: Ip::UNSPECIFIED,
            remote_port: 0,
            ..*k
        };
        self.rules
            .get(k)
            .or_else(|| self.rules.get(&remote_only))
            .or_else(|| self.rules.get(&listening))
            .map(|r| r.endpoint)
    }

    fn add_endpoint(&mut self) -> EndpointId {
        let i = self
            .endpoints
            .iter()
            .position(|e| !e)
            .unwrap_or(self.endpoints.len());
        if i == self.endpoints.len() {
            self.endpoints.push(true);
        } else {
            self.endpoints[i] = true;
        }
        EndpointId(i as u32)
    }

    fn live(&self, id: EndpointId) -> bool {
        self.endpoints.get(id.index()).copied().unwrap_or(false)
    }
}

fn local_ip(v6: bool) -> Ip {
    if v6 {
        Ip::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])
    } else {
        Ip::v4([192, 0, 2, 2])
    }
}

fn remote_ip(v6: bool, n: u8) -> Ip {
    if v6 {
        Ip::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, n])
    } else {
        Ip::v4([198, 51, 100, n])
    }
}

/// Keys from small pools, so that clashes and hits are common.
fn key_strategy() -> impl Strategy<Value = FlowKey> {
    (
        any::<bool>(),
        0u8..4,
        prop_oneof![Just(proto::TCP), Just(proto::UDP), Just(proto::ICMP)],
        prop_oneof![Just(22u16), Just(80), Just(0)],
        0u8..4,
        prop_oneof![Just(0u16), Just(1000), Just(1001), Just(2000)],
    )
        .prop_map(|(v6, kind, proto, lport, rip, rport)| {
            let remote = remote_ip(v6, rip);
            let (remote_ip, remote_port) = match kind {
                0 => (Ip::UNSPECIFIED, 0),   // listening
                1 => (remote, 0),            // remote address only
                _ => (remote, rport.max(1)), // connection
            };
            FlowKey {
                local_ip: local_ip(v6),
                remote_ip,
                local_port: lport,
                remote_port,
                proto,
            }
        })
}

#[derive(Clone, Debug)]
enum Op {
    AddEndpoint,
    RemoveEndpoint(u32),
    AddRule(FlowKey, u32, Origin),
    Learn(FlowKey, u32),
    RemoveRule(FlowKey, Option<u32>),
    Age(u32, u64),
    AddMac(u8, u32),
    Publish,
    Merge,
    Hold,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let origin = prop_oneof![
        Just(Origin::Static),
        Just(Origin::Client),
        Just(Origin::Learned)
    ];
    prop_oneof![
        1 => Just(Op::AddEndpoint),
        1 => (0u32..5).prop_map(Op::RemoveEndpoint),
        6 => (key_strategy(), 0u32..5, origin).prop_map(|(k, e, o)| Op::AddRule(k, e, o)),
        6 => (key_strategy(), 0u32..5).prop_map(|(k, e)| Op::Learn(k, e)),
        4 => (key_strategy(), proptest::option::of(0u32..5)).prop_map(|(k, o)| Op::RemoveRule(k, o)),
        1 => (0u32..5, any::<u64>()).prop_map(|(e, s)| Op::Age(e, s)),
        1 => (0u8..4, 0u32..5).prop_map(|(m, e)| Op::AddMac(m, e)),
        4 => Just(Op::Publish),
        1 => Just(Op::Merge),
        1 => Just(Op::Hold),
    ]
}

/// A deterministic "random" keep predicate for ageing.
fn keep(seed: u64, k: &FlowKey) -> bool {
    let mut h = seed;
    for b in k.remote_ip.0.iter().chain(&k.local_ip.0) {
        h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
    }
    h ^= u64::from(k.remote_port) << 8 | u64::from(k.local_port) << 24 | u64::from(k.proto);
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 63 == 0
}

fn check_snapshot(snap: &Snapshot, model: &Model, probes: &[FlowKey]) {
    let mut keys: Vec<FlowKey> = probes.to_vec();
    for k in model.rules.keys() {
        keys.push(*k);
        // Frames that hit remote-only and listening rules through the lookup order.
        keys.push(FlowKey {
            remote_port: 4242,
            remote_ip: if k.remote_ip.is_unspecified() {
                remote_ip(k.local_ip.is_v4(), 9)
            } else {
                k.remote_ip
            },
            ..*k
        });
    }
    let mut out = vec![None; keys.len()];
    snap.lookup_batch(&keys, &mut out);
    for (k, got) in keys.iter().zip(&out) {
        let want = model.lookup(k);
        assert_eq!(snap.lookup(k), want, "lookup {k:?}");
        assert_eq!(*got, want, "lookup_batch {k:?}");
        assert_eq!(snap.rule(k), model.rules.get(k).copied(), "rule {k:?}");
    }
    assert_eq!(snap.rule_count(), model.rules.len());
    for (i, live) in model.endpoints.iter().enumerate() {
        assert_eq!(snap.endpoint(EndpointId(i as u32)).is_some(), *live);
    }
    for m in 0..4u8 {
        let mac = [2, 0, 0, 0, 0, m];
        assert_eq!(snap.endpoint_by_mac(&mac), model.macs.get(&mac).copied());
    }
}

fn run(ops: Vec<Op>, probes: Vec<FlowKey>, policy: MergePolicy) {
    let mut table = Table::with_merge_policy(policy);
    let reader = table.reader();
    let mut model = Model::default();
    let mut published = model.clone();
    let mut held: Vec<(Arc<Snapshot>, Model)> = Vec::new();
    let mut generation = reader.load().generation();
    for op in ops {
        match op {
            Op::AddEndpoint => {
                let id = table.add_endpoint(EndpointKind::Client, "ep".into(), Arc::new(NoSink));
                assert_eq!(id, model.add_endpoint());
            }
            Op::RemoveEndpoint(e) => {
                let id = EndpointId(e);
                let before = model.rules.len();
                model.rules.retain(|_, r| r.endpoint != id);
                model.macs.retain(|_, m| *m != id);
                if let Some(live) = model.endpoints.get_mut(e as usize) {
                    *live = false;
                }
                assert_eq!(table.remove_endpoint(id), before - model.rules.len());
            }
            Op::AddRule(k, e, origin) => {
                let id = EndpointId(e);
                let want = if !model.live(id) {
                    Err(RuleError::NoEndpoint)
                } else {
                    match model.rules.entry(k) {
                        std::collections::btree_map::Entry::Occupied(_) => Err(RuleError::Exists),
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(RuleEntry {
                                endpoint: id,
                                origin,
                            });
                            Ok(())
                        }
                    }
                };
                assert_eq!(table.add_rule(k, id, origin), want);
            }
            Op::Learn(k, e) => {
                let id = EndpointId(e);
                let want = model.live(id) && !model.rules.contains_key(&k);
                if want {
                    model.rules.insert(
                        k,
                        RuleEntry {
                            endpoint: id,
                            origin: Origin::Learned,
                        },
                    );
                }
                assert_eq!(table.learn(k, id), want);
            }
            Op::RemoveRule(k, owner) => {
                let owner = owner.map(EndpointId);
                let want = match model.rules.get(&k) {
                    None => Err(RuleError::NotFound),
                    Some(r) if owner.is_some_and(|o| o != r.endpoint) => Err(RuleError::NotOwner),
                    Some(_) => Ok(model.rules.remove(&k).unwrap()),
                };
                assert_eq!(table.remove_rule(&k, owner), want);
            }
            Op::Age(e, seed) => {
                let id = EndpointId(e);
                let before = model.rules.len();
                model.rules.retain(|k, r| {
                    !(r.endpoint == id && r.origin == Origin::Learned) || keep(seed, k)
                });
                let removed = table.age_learned(id, &mut |k| keep(seed, k));
                assert_eq!(removed, before - model.rules.len());
            }
            Op::AddMac(m, e) => {
                let id = EndpointId(e);
                table.add_mac([2, 0, 0, 0, 0, m], id);
                // A MAC of an endpoint that does not exist (any more) is not added.
                if model.live(id) {
                    model.macs.insert([2, 0, 0, 0, 0, m], id);
                }
            }
            Op::Publish => {
                table.publish();
                generation += 1;
                published = model.clone();
                let snap = reader.load_full();
                assert_eq!(snap.generation(), generation);
                check_snapshot(&snap, &model, &probes);
            }
            Op::Merge => table.merge_now(),
            Op::Hold => held.push((reader.load_full(), published.clone())),
        }
        // The writer's own view is always current.
        assert_eq!(table.rule_count(), model.rules.len());
        for k in probes.iter().chain(model.rules.keys()) {
            assert_eq!(table.rule(k), model.rules.get(k).copied());
        }
        let mut rules: Vec<(FlowKey, RuleEntry)> = table.rules().map(|(k, r)| (*k, *r)).collect();
        rules.sort_by_key(|(k, _)| *k);
        assert!(rules.iter().map(|(k, r)| (k, r)).eq(model.rules.iter()));
    }
    table.publish();
    check_snapshot(&reader.load_full(), &model, &probes);
    for (snap, model) in &held {
        check_snapshot(snap, model, &probes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn table_agrees_with_model_inline_merges(
        ops in proptest::collection::vec(op_strategy(), 1..200),
        probes in proptest::collection::vec(key_strategy(), 0..16),
        min_delta in 1usize..8,
    ) {
        run(ops, probes, MergePolicy { min_delta, background: false });
    }

    #[test]
    fn table_agrees_with_model_background_merges(
        ops in proptest::collection::vec(op_strategy(), 1..200),
        probes in proptest::collection::vec(key_strategy(), 0..16),
        min_delta in 1usize..8,
    ) {
        run(ops, probes, MergePolicy { min_delta, background: true });
    }
}
