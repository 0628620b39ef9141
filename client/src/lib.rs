//! usnetd client library. PLACEHOLDER.

pub mod channel;
pub mod shm;
