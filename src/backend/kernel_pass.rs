//! The kernel's fast path. With the XDP backend, frames that the switch would give the kernel
//! anyway go to the kernel's stack from the XDP program (`XDP_PASS`), without the trip through
//! an AF_XDP socket, a worker and the TAP; with every backend that has a TAP, the kernel's own
//! frames that the switch would send out unchanged leave from the TAP's egress (see below).
//!
//! Why: for a frame to the kernel, most of the switch's cost is the kernel's own receive path,
//! which a TAP write runs on the worker's core (see `eval/RESULTS.md`). Passed from XDP, the
//! kernel receives the frame as it would without the switch: in the NIC's receive softirq,
//! with GRO, and the worker never sees it.
//!
//! What passes (the steering program in `backend::bpf`, fed by [`KernelPassMirror`]): an
//! untagged TCP or UDP frame, IPv4 unfragmented and without options or IPv6 without extension
//! headers, whose
//! - connection key (local ip, remote ip, protocol, local port, remote port) is a rule of the
//!   kernel: learned from its outgoing frames, or static; or whose
//! - listening key (remote side empty) is a rule of the kernel (DEBUG_PORTS), while no other
//!   endpoint has any rule under that local address, protocol and port: such a rule (a
//!   connection rule, or one with the remote address only) comes first in the switch's lookup
//!   order, so while one exists those frames go through the switch.
//!
//! Everything else goes to the AF_XDP sockets as before: ARP, DHCP, neighbour discovery,
//! fragments (whose
//! decision the switch remembers), ICMP, frames for clients, frames for nobody (dropped: the
//! firewall). The switch's lookup gives the kernel exactly the frames that pass, so the
//! firewall is the same; a rule change reaches the map before the table publishes it.
//!
//! Left to the switch's slow path, correct but not fast: kernel rules with the remote address
//! only, a map that is full ([`DEFAULT_MAX_RULES`] per family; refused keys are counted).
//!
//! The egress half ([`KernelPass::attach_egress`]): a tcx program on the kernel's TAP looks
//! up each frame the kernel sends in the same maps, with the frame's source as the local side,
//! and sends a hit straight out of the NIC (`bpf_redirect`). Such a frame is one the switch
//! would send to the NIC unchanged: of a connection rule of the kernel (learning it again is a
//! no-op), or leaving from one of its listening rules (which teaches nothing). Except when it
//! goes to a group address or to a local endpoint's MAC, which the switch delivers locally:
//! the mirror keeps the table's local MACs in a third map, and if one cannot be added the
//! egress half stops for good ([`KernelPass::stop_egress`]). New flows' first frames still
//! go through the switch, which learns from them.
//! `NO_KERNEL_FAST_PATH=true` turns it off; PCAP_LOG does too (passed frames would miss the log).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use usnetd_shards::endpoint::EndpointId;
use usnetd_shards::key::{proto, FlowKey, Ip};
use usnetd_shards::snapshot::RuleEntry;
use usnetd_shards::table::RuleObserver;

use super::bpf::{
    KernelPassMap, MacKey, PassCounters, PassKey, PassKey6, TapEgressProgram, TcxLink,
};

/// Keys the fast path holds per NIC and address family; beyond, kernel flows take the
/// switch's path.
pub const DEFAULT_MAX_RULES: u32 = 65536;

/// Local MACs the egress fast path can hold; one more stops it (see [`KernelPass`]).
pub const DEFAULT_MAX_MACS: u32 = 4096;

/// The BPF side of one NIC's fast path: the maps, the frame counters and the egress program's
/// link.
#[derive(Debug)]
pub struct KernelPass {
    /// The IPv4 keys whose frames pass.
    pub map4: KernelPassMap<PassKey>,
    /// The IPv6 keys whose frames pass.
    pub map6: KernelPassMap<PassKey6>,
    /// The local endpoints' MACs: the kernel's frames to them take the switch's path.
    pub macs: KernelPassMap<MacKey>,
    /// Frames passed.
    pub counters: PassCounters,
    /// Counts kept by the mirror.
    pub stats: PassStats,
    egress: std::sync::Mutex<Egress>,
}

/// The egress half: not (yet) attached, attached, or stopped for good.
#[derive(Debug)]
enum Egress {
    Off,
    On(#[allow(dead_code)] TcxLink),
    /// A local MAC could not be recorded: frames to it must not leave around the switch.
    Stopped,
}

impl KernelPass {
    /// Creates the maps (up to `max_rules` keys each, [`DEFAULT_MAX_MACS`] MACs) and the
    /// counters.
    pub fn create(max_rules: u32) -> io::Result<KernelPass> {
        Ok(KernelPass {
            map4: KernelPassMap::create(max_rules)?,
            map6: KernelPassMap::create(max_rules)?,
            macs: KernelPassMap::create(DEFAULT_MAX_MACS)?,
            counters: PassCounters::create()?,
            stats: PassStats::default(),
            egress: std::sync::Mutex::new(Egress::Off),
        })
    }

    /// Attaches the egress half to the kernel's TAP `tap_ifindex`: the kernel's frames of its
    /// rules leave through NIC `nic_ifindex` without the switch. Call after the mirror is
    /// installed (the maps must hold the local MACs first). `Ok(false)`: stopped already.
    pub fn attach_egress(&self, tap_ifindex: u32, nic_ifindex: u32) -> io::Result<bool> {
        let mut egress = self.egress.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*egress, Egress::Stopped) {
            return Ok(false);
        }
        let prog = TapEgressProgram::load(
            nic_ifindex,
            &self.map4,
            &self.map6,
            &self.macs,
            &self.counters,
        )?;
        *egress = Egress::On(prog.attach(tap_ifindex)?);
        Ok(true)
    }

    /// Detaches the egress half for good (frames of the kernel all take the switch's path).
    pub fn stop_egress(&self) {
        *self.egress.lock().unwrap_or_else(|e| e.into_inner()) = Egress::Stopped;
    }

    /// `"on"`, `"off"` (never attached) or `"stopped"`, for stats.json.
    pub fn egress_state(&self) -> &'static str {
        match *self.egress.lock().unwrap_or_else(|e| e.into_inner()) {
            Egress::Off => "off",
            Egress::On(_) => "on",
            Egress::Stopped => "stopped",
        }
    }
}

/// The mirror's counts, for stats.json.
#[derive(Debug, Default)]
pub struct PassStats {
    /// Keys in the map now.
    pub rules: AtomicU64,
    /// Keys the map refused (full, or another error); their frames take the switch's path.
    pub refused: AtomicU64,
    /// Local MACs in the map now.
    pub macs: AtomicU64,
}

/// A key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnyPassKey {
    /// For IPv4 frames.
    V4(PassKey),
    /// For IPv6 frames.
    V6(PassKey6),
}

/// Where the mirror writes keys: the BPF maps, or a set in tests.
pub trait PassRules: Send {
    /// Adds `key`.
    fn insert(&mut self, key: &AnyPassKey) -> io::Result<()>;
    /// Removes `key`; `Ok(false)` when it was not there.
    fn remove(&mut self, key: &AnyPassKey) -> io::Result<bool>;
    /// Adds a local endpoint's MAC.
    fn insert_mac(&mut self, mac: &MacKey) -> io::Result<()>;
    /// Removes a MAC; `Ok(false)` when it was not there.
    fn remove_mac(&mut self, mac: &MacKey) -> io::Result<bool>;
    /// Stops the egress half for good (a MAC could not be added).
    fn stop_egress(&mut self);
    /// Counts and stats.
    fn stats(&self) -> &PassStats;
}

impl PassRules for Arc<KernelPass> {
    fn insert(&mut self, key: &AnyPassKey) -> io::Result<()> {
        match key {
            AnyPassKey::V4(k) => self.map4.insert(k),
            AnyPassKey::V6(k) => self.map6.insert(k),
        }
    }
    fn remove(&mut self, key: &AnyPassKey) -> io::Result<bool> {
        match key {
            AnyPassKey::V4(k) => self.map4.remove(k),
            AnyPassKey::V6(k) => self.map6.remove(k),
        }
    }
    fn insert_mac(&mut self, mac: &MacKey) -> io::Result<()> {
        self.macs.insert(mac)
    }
    fn remove_mac(&mut self, mac: &MacKey) -> io::Result<bool> {
        self.macs.remove(mac)
    }
    fn stop_egress(&mut self) {
        KernelPass::stop_egress(self);
    }
    fn stats(&self) -> &PassStats {
        &self.stats
    }
}

/// A rule's local side: address, protocol, port.
type LocalSide = (Ip, u8, u16);

/// Keeps the fast path's keys equal to what the switch's table gives the kernel (see the module
/// docs). Installed as the table's [`RuleObserver`], so it runs under the table's lock, before
/// every publish.
pub struct KernelPassMirror<M: PassRules> {
    kernel: EndpointId,
    map: M,
    /// The kernel's listening rules.
    kernel_listening: HashSet<LocalSide>,
    /// How many rules of other endpoints each local side has.
    foreign: HashMap<LocalSide, u32>,
    warned: bool,
}

/// The IPv4 address in `ip`, if it is one.
fn v4(ip: &Ip) -> Option<[u8; 4]> {
    ip.is_v4().then(|| [ip.0[12], ip.0[13], ip.0[14], ip.0[15]])
}

/// The key's local side, for a TCP or UDP rule on a (specified) address and a port.
fn local_side(key: &FlowKey) -> Option<LocalSide> {
    if !matches!(key.proto, proto::TCP | proto::UDP)
        || key.local_port == 0
        || key.local_ip.is_unspecified()
    {
        return None;
    }
    Some((key.local_ip, key.proto, key.local_port))
}

/// The fast-path key of a frame from `remote`:`remote_port` (`UNSPECIFIED`, 0: the listening
/// key) to `side`; `None` when the addresses' families differ.
fn pass_key(side: LocalSide, remote: Ip, remote_port: u16) -> Option<AnyPassKey> {
    let (local, proto, port) = side;
    match v4(&local) {
        Some(l) => {
            let r = if remote.is_unspecified() {
                [0; 4]
            } else {
                v4(&remote)?
            };
            Some(AnyPassKey::V4(PassKey::new(l, r, port, remote_port, proto)))
        }
        None => {
            if remote.is_v4() {
                return None;
            }
            Some(AnyPassKey::V6(PassKey6::new(
                local.0,
                remote.0,
                port,
                remote_port,
                proto,
            )))
        }
    }
}

impl<M: PassRules> KernelPassMirror<M> {
    /// A mirror of `kernel`'s rules into `map` (which starts empty).
    pub fn new(kernel: EndpointId, map: M) -> Self {
        KernelPassMirror {
            kernel,
            map,
            kernel_listening: HashSet::new(),
            foreign: HashMap::new(),
            warned: false,
        }
    }

    fn listening_key(side: LocalSide) -> AnyPassKey {
        pass_key(side, Ip::UNSPECIFIED, 0).expect("the listening key of any family")
    }

    fn insert(&mut self, key: AnyPassKey) {
        match self.map.insert(&key) {
            Ok(()) => {
                self.map.stats().rules.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.map.stats().refused.fetch_add(1, Ordering::Relaxed);
                if !self.warned {
                    self.warned = true;
                    log::warn!(
                        "kernel fast path: key refused ({e}); such flows take the switch's path \
                         (counted in stats.json, warned once)"
                    );
                }
            }
        }
    }

    fn remove(&mut self, key: AnyPassKey) {
        match self.map.remove(&key) {
            Ok(true) => {
                self.map.stats().rules.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            // Deleting a key of a live map has no other failure; should one come, frames of
            // that key would still reach the kernel, so say so loudly.
            Err(e) => log::error!("kernel fast path: removing a key failed: {e}"),
        }
    }

    fn kernel_rule(&mut self, key: &FlowKey, side: LocalSide, added: bool) {
        if key.is_listening() {
            let free = self.foreign.get(&side).copied().unwrap_or(0) == 0;
            if added {
                self.kernel_listening.insert(side);
                if free {
                    self.insert(Self::listening_key(side));
                }
            } else {
                self.kernel_listening.remove(&side);
                self.remove(Self::listening_key(side));
            }
            return;
        }
        if key.remote_port == 0 {
            return; // remote address only: the switch's path
        }
        let Some(pass) = pass_key(side, key.remote_ip, key.remote_port) else {
            return;
        };
        if added {
            self.insert(pass);
        } else {
            self.remove(pass);
        }
    }

    fn foreign_rule(&mut self, side: LocalSide, added: bool) {
        let count = self.foreign.entry(side).or_insert(0);
        let before = *count;
        if added {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
        let after = *count;
        if after == 0 {
            self.foreign.remove(&side);
        }
        if !self.kernel_listening.contains(&side) {
            return;
        }
        match (before, after) {
            (0, 1) => self.remove(Self::listening_key(side)),
            (1, 0) => self.insert(Self::listening_key(side)),
            _ => {}
        }
    }
}

impl<M: PassRules> RuleObserver for KernelPassMirror<M> {
    fn rule_changed(&mut self, key: &FlowKey, entry: &RuleEntry, added: bool) {
        let Some(side) = local_side(key) else {
            return;
        };
        if entry.endpoint == self.kernel {
            self.kernel_rule(key, side, added);
        } else {
            self.foreign_rule(side, added);
        }
    }

    fn mac_changed(&mut self, mac: &[u8; 6], _endpoint: EndpointId, added: bool) {
        let key = MacKey::new(*mac);
        if added {
            match self.map.insert_mac(&key) {
                Ok(()) => {
                    self.map.stats().macs.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    // Frames to this MAC must be switched locally: from now on every frame of
                    // the kernel takes the switch's path.
                    self.map.stop_egress();
                    log::warn!(
                        "kernel fast path: local MAC {mac:02x?} refused ({e}); the kernel's \
                         frames all go through the switch from now on"
                    );
                }
            }
        } else {
            match self.map.remove_mac(&key) {
                Ok(true) => {
                    self.map.stats().macs.fetch_sub(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                // A MAC left behind only sends more frames through the switch.
                Err(e) => log::warn!("kernel fast path: removing a MAC failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usnetd_shards::snapshot::Origin;

    #[derive(Default)]
    struct SetRules {
        keys: HashSet<AnyPassKey>,
        macs: HashSet<MacKey>,
        stats: PassStats,
        capacity: usize,
        stopped: bool,
    }

    /// Adds `key` to `set` unless `set` holds `capacity` others already (`E2BIG`, as a full
    /// BPF hash map answers).
    fn insert_bounded<K: Copy + Eq + std::hash::Hash>(
        set: &mut HashSet<K>,
        capacity: usize,
        key: &K,
    ) -> io::Result<()> {
        if set.len() >= capacity && !set.contains(key) {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        set.insert(*key);
        Ok(())
    }

    impl PassRules for SetRules {
        fn insert(&mut self, key: &AnyPassKey) -> io::Result<()> {
            insert_bounded(&mut self.keys, self.capacity, key)
        }
        fn remove(&mut self, key: &AnyPassKey) -> io::Result<bool> {
            Ok(self.keys.remove(key))
        }
        fn insert_mac(&mut self, mac: &MacKey) -> io::Result<()> {
            insert_bounded(&mut self.macs, self.capacity, mac)
        }
        fn remove_mac(&mut self, mac: &MacKey) -> io::Result<bool> {
            Ok(self.macs.remove(mac))
        }
        fn stop_egress(&mut self) {
            self.stopped = true;
        }
        fn stats(&self) -> &PassStats {
            &self.stats
        }
    }

    /// A sink that takes every frame.
    struct NoSink;
    impl usnetd_shards::endpoint::EndpointSink for NoSink {
        fn deliver(&self, _worker: usize, frames: &[&[u8]]) -> usize {
            frames.len()
        }
    }

    /// A [`SetRules`] the test keeps a handle on while a table owns the mirror.
    struct Shared {
        set: Arc<std::sync::Mutex<SetRules>>,
        stats: Arc<PassStats>,
    }
    impl Shared {
        fn new(set: &Arc<std::sync::Mutex<SetRules>>) -> Shared {
            Shared {
                set: set.clone(),
                stats: Arc::default(),
            }
        }
    }
    impl PassRules for Shared {
        fn insert(&mut self, key: &AnyPassKey) -> io::Result<()> {
            self.set.lock().unwrap().insert(key)
        }
        fn remove(&mut self, key: &AnyPassKey) -> io::Result<bool> {
            self.set.lock().unwrap().remove(key)
        }
        fn insert_mac(&mut self, mac: &MacKey) -> io::Result<()> {
            self.set.lock().unwrap().insert_mac(mac)
        }
        fn remove_mac(&mut self, mac: &MacKey) -> io::Result<bool> {
            self.set.lock().unwrap().remove_mac(mac)
        }
        fn stop_egress(&mut self) {
            self.set.lock().unwrap().stop_egress()
        }
        fn stats(&self) -> &PassStats {
            &self.stats
        }
    }

    #[test]
    fn local_macs_are_mirrored_and_a_refused_one_stops_egress() {
        use usnetd_shards::endpoint::EndpointKind;
        use usnetd_shards::table::Table;
        let set = Arc::new(std::sync::Mutex::new(SetRules {
            capacity: 2,
            ..Default::default()
        }));
        let mut table = Table::new();
        let kernel = table.add_endpoint(EndpointKind::Kernel, "kernel".into(), Arc::new(NoSink));
        let client = table.add_endpoint(EndpointKind::Client, "c".into(), Arc::new(NoSink));
        let (m1, m2, m3) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 3]);
        table.add_mac(m1, kernel);
        let shared = Shared::new(&set);
        let stats = shared.stats.clone();
        table.set_rule_observer(Box::new(KernelPassMirror::new(kernel, shared)));
        table.add_mac(m2, client);
        let macs = |s: &SetRules| s.macs.iter().map(|k| k.mac).collect::<HashSet<_>>();
        assert_eq!(macs(&set.lock().unwrap()), [m1, m2].into());
        assert!(!set.lock().unwrap().stopped);
        // Full: the third is refused, and the egress half stops.
        table.add_mac(m3, client);
        assert!(set.lock().unwrap().stopped);
        // The client goes: its MACs go.
        table.remove_endpoint(client);
        assert_eq!(macs(&set.lock().unwrap()), [m1].into());
        assert_eq!(stats.macs.load(Ordering::Relaxed), 1);
    }

    const KERNEL: EndpointId = EndpointId(0);
    const CLIENT: EndpointId = EndpointId(1);

    fn key(remote: [u8; 4], local_port: u16, remote_port: u16, proto: u8) -> FlowKey {
        FlowKey {
            local_ip: Ip::v4([10, 0, 0, 1]),
            remote_ip: if remote == [0; 4] {
                Ip::UNSPECIFIED
            } else {
                Ip::v4(remote)
            },
            local_port,
            remote_port,
            proto,
        }
    }

    fn entry(endpoint: EndpointId) -> RuleEntry {
        RuleEntry {
            endpoint,
            origin: Origin::Static,
        }
    }

    fn mirror(capacity: usize) -> KernelPassMirror<SetRules> {
        KernelPassMirror::new(
            KERNEL,
            SetRules {
                capacity,
                ..Default::default()
            },
        )
    }

    fn keys(m: &KernelPassMirror<SetRules>) -> HashSet<AnyPassKey> {
        m.map.keys.clone()
    }

    #[test]
    fn kernel_connection_and_listening_rules_pass() {
        let mut m = mirror(16);
        let conn = key([10, 0, 0, 2], 40000, 80, proto::TCP);
        let listen = key([0; 4], 22, 0, proto::TCP);
        m.rule_changed(&conn, &entry(KERNEL), true);
        m.rule_changed(&listen, &entry(KERNEL), true);
        let want: HashSet<AnyPassKey> = [
            AnyPassKey::V4(PassKey::new(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                40000,
                80,
                proto::TCP,
            )),
            AnyPassKey::V4(PassKey::new([10, 0, 0, 1], [0; 4], 22, 0, proto::TCP)),
        ]
        .into();
        assert_eq!(keys(&m), want);
        assert_eq!(m.map.stats.rules.load(Ordering::Relaxed), 2);
        m.rule_changed(&conn, &entry(KERNEL), false);
        m.rule_changed(&listen, &entry(KERNEL), false);
        assert!(keys(&m).is_empty());
        assert_eq!(m.map.stats.rules.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn what_the_switch_must_decide_is_not_mirrored() {
        let mut m = mirror(16);
        for k in [
            key([10, 0, 0, 2], 0, 0, proto::ICMP),       // portless
            key([10, 0, 0, 2], 53, 0, proto::UDP),       // remote address only
            key([0; 4], 0, 0, proto::UDP),               // protocol-wide
            key([10, 0, 0, 2], 5000, 1000, proto::SCTP), // not TCP/UDP
            FlowKey {
                local_ip: Ip::UNSPECIFIED,
                ..key([0; 4], 22, 0, proto::TCP)
            }, // any local address
            FlowKey {
                local_ip: Ip::v6(L6),
                ..key([10, 0, 0, 2], 22, 5, proto::TCP)
            }, // mixed families
        ] {
            m.rule_changed(&k, &entry(KERNEL), true);
        }
        assert!(keys(&m).is_empty());
        // A client's rules never pass.
        m.rule_changed(
            &key([10, 0, 0, 2], 80, 1000, proto::TCP),
            &entry(CLIENT),
            true,
        );
        m.rule_changed(&key([0; 4], 8080, 0, proto::TCP), &entry(CLIENT), true);
        assert!(keys(&m).is_empty());
    }

    const L6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const R6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    #[test]
    fn ipv6_rules_pass_with_ipv6_keys() {
        let mut m = mirror(16);
        let conn = FlowKey {
            local_ip: Ip::v6(L6),
            remote_ip: Ip::v6(R6),
            local_port: 40000,
            remote_port: 80,
            proto: proto::TCP,
        };
        m.rule_changed(&conn, &entry(KERNEL), true);
        m.rule_changed(&conn.listening(), &entry(KERNEL), true);
        let want: HashSet<AnyPassKey> = [
            AnyPassKey::V6(PassKey6::new(L6, R6, 40000, 80, proto::TCP)),
            AnyPassKey::V6(PassKey6::new(L6, [0; 16], 40000, 0, proto::TCP)),
        ]
        .into();
        assert_eq!(keys(&m), want);
        // A client's rule under the same local side suspends the listening key.
        let client = FlowKey {
            remote_port: 81,
            ..conn
        };
        m.rule_changed(&client, &entry(CLIENT), true);
        assert_eq!(keys(&m).len(), 1);
        m.rule_changed(&client, &entry(CLIENT), false);
        assert_eq!(keys(&m), want);
    }

    #[test]
    fn another_endpoints_rule_under_a_kernel_port_suspends_the_listening_key() {
        let mut m = mirror(16);
        let listen = key([0; 4], 7000, 0, proto::UDP);
        let listen_key = AnyPassKey::V4(PassKey::new([10, 0, 0, 1], [0; 4], 7000, 0, proto::UDP));
        let client_conn = key([10, 0, 0, 2], 7000, 999, proto::UDP);
        let client_remote = key([10, 0, 0, 3], 7000, 0, proto::UDP);
        // A client's rule first, then the kernel's listening rule: not mirrored...
        m.rule_changed(&client_conn, &entry(CLIENT), true);
        m.rule_changed(&listen, &entry(KERNEL), true);
        assert!(keys(&m).is_empty());
        // ...until the last such rule goes.
        m.rule_changed(&client_remote, &entry(CLIENT), true);
        m.rule_changed(&client_conn, &entry(CLIENT), false);
        assert!(keys(&m).is_empty());
        m.rule_changed(&client_remote, &entry(CLIENT), false);
        assert_eq!(keys(&m), [listen_key].into());
        // The other order: the key goes when a client's rule comes.
        m.rule_changed(&client_conn, &entry(CLIENT), true);
        assert!(keys(&m).is_empty());
        // Other ports, protocols and the kernel's own connection rules do not matter.
        m.rule_changed(&client_conn, &entry(CLIENT), false);
        m.rule_changed(
            &key([10, 0, 0, 2], 7001, 1, proto::UDP),
            &entry(CLIENT),
            true,
        );
        m.rule_changed(
            &key([10, 0, 0, 2], 7000, 1, proto::TCP),
            &entry(CLIENT),
            true,
        );
        m.rule_changed(
            &key([10, 0, 0, 2], 7000, 5, proto::UDP),
            &entry(KERNEL),
            true,
        );
        assert!(keys(&m).contains(&listen_key));
        assert_eq!(keys(&m).len(), 2);
    }

    #[test]
    fn a_full_map_is_counted_and_nothing_is_lost() {
        let mut m = mirror(1);
        m.rule_changed(&key([10, 0, 0, 2], 1, 2, proto::TCP), &entry(KERNEL), true);
        m.rule_changed(&key([10, 0, 0, 2], 3, 4, proto::TCP), &entry(KERNEL), true);
        assert_eq!(keys(&m).len(), 1);
        assert_eq!(m.map.stats.refused.load(Ordering::Relaxed), 1);
        // Removing the refused one is harmless, and frees nothing.
        m.rule_changed(&key([10, 0, 0, 2], 3, 4, proto::TCP), &entry(KERNEL), false);
        assert_eq!(keys(&m).len(), 1);
        assert_eq!(m.map.stats.rules.load(Ordering::Relaxed), 1);
    }

    /// The mirror against the switch's own lookup: every frame key the mirror's map would
    /// pass is one the table gives the kernel, after any sequence of rule changes.
    #[test]
    fn passes_only_what_the_table_gives_the_kernel() {
        use usnetd_shards::endpoint::EndpointKind;
        use usnetd_shards::table::Table;

        let mut table = Table::new();
        let kernel = table.add_endpoint(EndpointKind::Kernel, "kernel".into(), Arc::new(NoSink));
        let client = table.add_endpoint(EndpointKind::Client, "c".into(), Arc::new(NoSink));
        let set = Arc::new(std::sync::Mutex::new(SetRules {
            capacity: 1 << 20,
            ..Default::default()
        }));
        table.set_rule_observer(Box::new(KernelPassMirror::new(kernel, Shared::new(&set))));
        // A small universe of keys, and a deterministic pseudo-random walk over rule changes.
        let remotes = [[0; 4], [10, 0, 0, 2], [10, 0, 0, 3]];
        let mut universe = Vec::new();
        for r in remotes {
            for lp in [5000u16, 5001] {
                for rp in [0u16, 7] {
                    for p in [proto::TCP, proto::UDP] {
                        if r == [0; 4] && rp != 0 {
                            continue;
                        }
                        universe.push(key(r, lp, rp, p));
                    }
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = universe[(x % universe.len() as u64) as usize];
            let owner = if (x >> 20).is_multiple_of(2) {
                kernel
            } else {
                client
            };
            if (x >> 30).is_multiple_of(3) {
                let _ = table.remove_rule(&k, None);
            } else {
                let _ = table.add_rule(k, owner, Origin::Static);
            }
            table.publish();
            let snapshot = table.reader().load_full();
            let passed = set.lock().unwrap().keys.clone();
            for r in &remotes[1..] {
                for lp in [5000u16, 5001] {
                    for p in [proto::TCP, proto::UDP] {
                        let frame = key(*r, lp, 7, p);
                        let pk = AnyPassKey::V4(PassKey::new([10, 0, 0, 1], *r, lp, 7, p));
                        let lk = AnyPassKey::V4(PassKey::new([10, 0, 0, 1], [0; 4], lp, 0, p));
                        let passes = passed.contains(&pk) || passed.contains(&lk);
                        if passes {
                            assert_eq!(snapshot.lookup(&frame), Some(kernel), "{frame:?}");
                        }
                        // And the kernel's connection rules always pass.
                        if snapshot.rule(&frame).is_some_and(|e| e.endpoint == kernel) {
                            assert!(passes, "{frame:?}");
                        }
                    }
                }
            }
        }
    }
}
