//! # usnetd-shards: the sharded data plane of usnetd
//!
//! A frame's way through this crate, one file per step:
//!
//! 1. [`port`]: a NIC backend lends a batch of frames from one receive queue ([`port::RxQueue`]).
//! 2. [`frame`]: each frame is classified (Ethernet, VLAN, ARP, IPv4/IPv6, L4 ports, fragments,
//!    DHCP) without copying, into a [`key::FlowKey`].
//! 3. [`snapshot`]: the key is looked up in the worker's current immutable rule snapshot
//!    (connection rule first, then listening rule), which the control side publishes through
//!    `arc-swap` ([`table`] is the single writer).
//! 4. [`worker`]: frames are grouped per destination [`endpoint`] and each group is handed to
//!    that endpoint's channel ([`endpoint::EndpointSink`]) in one call; drops are counted by
//!    reason ([`counters`]).
//!
//! Frames may carry offload metadata (a TCP super-segment from GRO/TSO, a partial checksum):
//! [`offload`] holds it and makes wire frames for endpoints that cannot take it.
//!
//! Nothing here does OS I/O: backends live in the daemon and implement [`port`]'s traits; the
//! in-memory [`memport`] implements them for tests and benchmarks.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod coalesce;
pub mod cores;
pub mod counters;
pub mod endpoint;
pub mod frag;
pub mod frame;
pub mod key;
pub mod memport;
pub mod offload;
pub mod port;
pub mod snapshot;
pub mod table;
pub mod worker;
