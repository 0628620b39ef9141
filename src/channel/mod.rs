//! Endpoint packet channels: how frames move between the switch's workers and a client.
//!
//! Each channel has a switch side made of an [`usnetd_shards::endpoint::EndpointSink`] (the
//! workers deliver frames for the endpoint into it, from several workers at once) and an
//! [`usnetd_shards::port::RxQueue`] (a worker reads the endpoint's outgoing frames from it),
//! plus something to hand to the client:
//!
//! - [`uds`]: the Unix-datagram socketpair of the `RequestUDS` protocol (one frame per
//!   datagram, no header); one `sendmmsg` per delivered batch, one `recvmmsg` per received
//!   batch.
//! - [`shm`]: shared-memory rings in a memfd (one switch-to-client ring per worker, one
//!   client-to-switch ring) with eventfd wake-ups only when the other side sleeps; the layout is
//!   documented in [`usnetd_client::shm`], which both sides share.

pub mod shm;
pub mod uds;

pub use shm::{ShmChannel, ShmHandover, ShmSink, ShmSource};
pub use uds::{UdsChannel, UdsSink, UdsSource};
