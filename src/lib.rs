//! # usnetd: the daemon
//!
//! Claims NICs, shares them between the host kernel and userspace network stacks, and firewalls
//! the kernel. The data plane itself lives in the `usnetd-shards` crate; this crate holds the
//! OS-facing parts: NIC backends ([`backend`]), the host kernel's side ([`host`]), endpoint
//! packet channels ([`channel`]), the control socket ([`control`]), configuration ([`config`])
//! and the wiring of threads ([`daemon`]).

pub mod backend;
pub mod channel;
pub mod config;
pub mod control;
pub mod daemon;
pub mod host;
pub mod pcap;
pub mod sys;
