//! The host kernel's side of the switch: a TAP device that takes the NIC's place for the
//! kernel while the switch runs.
//!
//! - [`tap`]: the TAP device, its [`tap::TapSink`] (an `EndpointSink`: frames for the kernel)
//!   and its [`tap::TapRxQueue`]s (an `RxQueue`: frames the kernel sends).
//! - [`takeover`]: moves the NIC's MAC, MTU, addresses and routes to the TAP and back, with a
//!   state file that lets the next start repair what a crash left behind.
//! - [`gso`]: segmentation and checksum completion for the TAP's offload mode.
//! - [`rps`]: the cores where the kernel processes the frames written into the TAP.
//! - [`procnet`]: the kernel's sockets and ephemeral port range, for ageing kernel rules and
//!   refusing client rules on kernel ports.
//!
//! [`HostKernel::start`] does it all in the right order: repair leftovers, record the NIC and
//! write the state file, create the TAP, move the kernel's view onto it. Dropping the
//! [`HostKernel`] (or [`HostKernel::restore`]) puts the NIC back.

pub use usnetd_shards::offload as gso;
pub mod procnet;
pub mod rps;
pub mod sockdiag;
pub mod takeover;
pub mod tap;
pub mod uring;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use takeover::{Takeover, TakeoverConfig};
use tap::{Tap, TapConfig, TapRxQueue, TapSink};

/// How to set up the kernel's side of one NIC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// The claimed NIC.
    pub nic: String,
    /// The TAP's name; `None` means [`tap::tap_name_for`] of the NIC.
    pub tap_name: Option<String>,
    /// TAP queues (one per worker is best; 1 disables `IFF_MULTI_QUEUE`).
    pub queues: usize,
    /// Directory of the state file (default [`takeover::DEFAULT_STATE_DIR`]).
    pub state_dir: PathBuf,
    /// Whether to set the ARP sysctls on the NIC (see [`takeover`]).
    pub arp_sysctls: bool,
    /// TAP offloads: the kernel hands TCP super-segments, segmented in software (see [`tap`]).
    pub offload: bool,
    /// RPS cores of the TAP's receive queues (see [`rps`]); empty leaves RPS off.
    pub rps_cores: Vec<usize>,
    /// With offloads: write consecutive UDP datagrams of a flow as one UDP GSO super-packet
    /// (see [`tap::TapSink`]).
    pub coalesce: bool,
    /// Submit the writes of a batch to the TAP through io_uring, where the kernel allows it
    /// (see [`uring`]).
    pub io_uring: bool,
}

impl HostConfig {
    /// Defaults for `nic`: TAP `<nic>usnetd`, one queue, state in `/run/usnetd`, ARP sysctls,
    /// no offloads, no RPS, writes through io_uring.
    pub fn new(nic: &str) -> HostConfig {
        HostConfig {
            nic: nic.to_string(),
            tap_name: None,
            queues: 1,
            state_dir: PathBuf::from(takeover::DEFAULT_STATE_DIR),
            arp_sysctls: true,
            offload: false,
            rps_cores: Vec::new(),
            coalesce: false,
            io_uring: true,
        }
    }

    /// The takeover part of this configuration.
    pub fn takeover_config(&self) -> TakeoverConfig {
        TakeoverConfig {
            nic: self.nic.clone(),
            tap: self
                .tap_name
                .clone()
                .unwrap_or_else(|| tap::tap_name_for(&self.nic)),
            state_dir: self.state_dir.clone(),
            arp_sysctls: self.arp_sysctls,
        }
    }
}

/// The kernel's side of one NIC while the switch runs. Restores the NIC when dropped.
#[derive(Debug)]
pub struct HostKernel {
    takeover: Takeover,
    tap: Tap,
    coalesce: bool,
    io_uring: bool,
}

impl HostKernel {
    /// Repairs leftovers, records the NIC (state file first), creates the TAP and moves the
    /// kernel's addresses and routes onto it. On error everything is put back.
    pub fn start(config: &HostConfig) -> io::Result<HostKernel> {
        let takeover_config = config.takeover_config();
        let mut takeover = Takeover::prepare(&takeover_config)?;
        let tap = Tap::open(&TapConfig {
            name: takeover_config.tap.clone(),
            queues: config.queues,
            offload: config.offload,
        })?;
        if !config.rps_cores.is_empty() {
            // Only an optimisation: without it the kernel still gets every frame.
            let applied = takeover::ip_json(&["link", "show", "dev", tap.name()])
                .and_then(|links| {
                    links[0]["ifindex"]
                        .as_u64()
                        .ok_or_else(|| io::Error::other("no ifindex in `ip -json link`"))
                })
                .and_then(|ifindex| rps::set_rps_cores(tap.name(), ifindex, &config.rps_cores));
            match applied {
                Ok(n) => log::info!(
                    "{}: the kernel processes frames from the switch on cores {:?} (RPS, {n} queues)",
                    tap.name(),
                    config.rps_cores
                ),
                Err(e) => log::warn!("{}: RPS not set: {e}", tap.name()),
            }
        }
        // On error, dropping `takeover` restores (and deletes the TAP).
        takeover.apply()?;
        Ok(HostKernel {
            takeover,
            tap,
            coalesce: config.coalesce,
            io_uring: config.io_uring,
        })
    }

    /// The TAP device.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The takeover (recorded state, [`Takeover::reassert`]).
    pub fn takeover(&self) -> &Takeover {
        &self.takeover
    }

    /// The kernel endpoint's sink (frames for the kernel).
    pub fn sink(&self) -> Arc<TapSink> {
        self.tap.sink(self.coalesce, self.io_uring)
    }

    /// One receive queue per TAP queue (frames the kernel sends), sized for the NIC's MTU.
    pub fn rx_queues(&self) -> Vec<TapRxQueue> {
        let mtu = self.takeover.state().mtu().unwrap_or(1500) as usize;
        self.tap.rx_queues(mtu)
    }

    /// Like [`HostKernel::rx_queues`], lending the kernel's super-segments whole (see
    /// [`Tap::rx_queues_whole`]): for NIC transmit queues that take offloads.
    pub fn rx_queues_whole(&self) -> Vec<TapRxQueue> {
        let mtu = self.takeover.state().mtu().unwrap_or(1500) as usize;
        self.tap.rx_queues_whole(mtu)
    }

    /// Puts the NIC back now (also done on drop); idempotent.
    pub fn restore(&mut self) -> io::Result<()> {
        self.takeover.restore()
    }
}
