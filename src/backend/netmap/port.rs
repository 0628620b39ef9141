//! A registered `/dev/netmap` file descriptor with its mapped memory: the rings it may use.
//!
//! API: [`NetmapDevice`] (opens `/dev/netmap`, `NotFound` when the module is not loaded),
//! [`Port::open`] (open + `NIOCREGIF` + `mmap`), [`Port::rx`] / [`Port::tx`] (rings as
//! queues), [`InterfaceLayout`] (ring offsets from the `struct netmap_if`).

use std::io;
use std::mem::offset_of;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use netmap_sys::netmap::{netmap_if, nmreq as NmReq};

use super::nmreq::{self, Registration};
use super::ring::{FdSync, NetmapRx, NetmapTx, Region};

/// Where the netmap device lives.
pub const DEFAULT_DEVICE: &str = "/dev/netmap";

/// The netmap control device.
#[derive(Clone, Debug)]
pub struct NetmapDevice {
    path: PathBuf,
}

impl Default for NetmapDevice {
    fn default() -> Self {
        NetmapDevice::new(DEFAULT_DEVICE)
    }
}

impl NetmapDevice {
    /// The device at `path` (tests point it elsewhere).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        NetmapDevice { path: path.into() }
    }

    /// The device path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the device. A missing device gives `NotFound` ("netmap module not loaded").
    pub fn open(&self) -> io::Result<OwnedFd> {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
        {
            Ok(f) => Ok(OwnedFd::from(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("netmap module not loaded ({} missing)", self.path.display()),
            )),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("open {}: {e}", self.path.display()),
            )),
        }
    }
}

/// A shared mapping of a netmap fd; unmapped on drop.
struct Mmap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is process-wide memory owned by this value; freed only in Drop.
unsafe impl Send for Mmap {}
// SAFETY: Mmap exposes nothing; accesses go through Region's volatile accessors.
unsafe impl Sync for Mmap {}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; unmapped only here.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The mappings of the netmap memory allocators this process uses, by allocator id
/// (`nr_arg2`). A port registered on an allocator that is already mapped reuses that mapping
/// (ring offsets are relative to the allocator's memory, as in netmap's own `nm_open` with a
/// parent), so the NIC's rings, its host rings and its pipes share one [`Region`], which is
/// what lets a frame move between them by buffer swap instead of a copy.
fn mapped_regions(
) -> &'static std::sync::Mutex<std::collections::HashMap<u16, std::sync::Weak<Region>>> {
    static MAPPED: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<u16, std::sync::Weak<Region>>>,
    > = std::sync::OnceLock::new();
    MAPPED.get_or_init(Default::default)
}

/// The [`Region`] of the registered `fd`: the existing mapping of its allocator when there is
/// a live one of the right size, else a new one.
fn map_region(fd: &OwnedFd, req: &NmReq) -> io::Result<Arc<Region>> {
    let mut mapped = mapped_regions().lock().unwrap_or_else(|p| p.into_inner());
    mapped.retain(|_, r| r.strong_count() > 0);
    if let Some(region) = mapped.get(&req.nr_arg2).and_then(std::sync::Weak::upgrade) {
        if region.len() == req.nr_memsize as usize {
            return Ok(region);
        }
    }
    let region = map_new_region(fd, req)?;
    mapped.insert(req.nr_arg2, Arc::downgrade(&region));
    Ok(region)
}

/// Maps the memory of the registered `fd` (`nr_memsize` bytes) as a new [`Region`].
fn map_new_region(fd: &OwnedFd, req: &NmReq) -> io::Result<Arc<Region>> {
    let len = req.nr_memsize as usize;
    if len == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "netmap reported an empty memory region",
        ));
    }
    // SAFETY: a fresh shared mapping of a netmap fd; no existing memory is affected.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("mmap(netmap): {e}")));
    }
    let owner = Box::new(Mmap {
        ptr: ptr.cast(),
        len,
    });
    // SAFETY: ptr..ptr+len is the mapping just created, owned (and unmapped) by `owner`.
    unsafe { Region::from_raw(ptr.cast(), len, req.nr_arg2, owner) }
}

/// Offset of `ni_host_tx_rings` in `struct netmap_if` (API 14: after `ni_bufs_head`;
/// `ni_spare1[0]` in netmap_sys's older binding).
const NI_HOST_TX_RINGS: usize = offset_of!(netmap_if, ni_spare1);
/// Offset of `ni_host_rx_rings`.
const NI_HOST_RX_RINGS: usize = NI_HOST_TX_RINGS + 4;
/// The most rings of one kind we accept from a `netmap_if` (netmap's own limit is 1024).
const MAX_RINGS: u32 = 1024;

/// The ring counts and offsets of a `struct netmap_if` (API 14 layout: `ring_ofs` lists the
/// hardware then host tx rings, then the hardware then host rx rings, each relative to the
/// `netmap_if`). Read once and checked against the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterfaceLayout {
    nifp_off: usize,
    /// Hardware tx rings.
    pub tx_rings: u32,
    /// Hardware rx rings.
    pub rx_rings: u32,
    /// Host tx rings.
    pub host_tx_rings: u32,
    /// Host rx rings.
    pub host_rx_rings: u32,
}

impl InterfaceLayout {
    /// Reads the `netmap_if` at `nifp_off` of `region`.
    pub fn read(region: &Region, nifp_off: usize) -> io::Result<Self> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad struct netmap_if");
        let load = |f: usize| {
            nifp_off
                .checked_add(f)
                .and_then(|o| region.load_u32(o))
                .filter(|&n| n <= MAX_RINGS)
                .ok_or_else(bad)
        };
        Ok(InterfaceLayout {
            nifp_off,
            tx_rings: load(offset_of!(netmap_if, ni_tx_rings))?,
            rx_rings: load(offset_of!(netmap_if, ni_rx_rings))?,
            host_tx_rings: load(NI_HOST_TX_RINGS)?,
            host_rx_rings: load(NI_HOST_RX_RINGS)?,
        })
    }

    fn ring_off(&self, region: &Region, entry: u32) -> io::Result<usize> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad netmap ring offset");
        let at = self.nifp_off + offset_of!(netmap_if, ring_ofs) + entry as usize * 8;
        let ofs = region.load_i64(at).ok_or_else(bad)?;
        let off = i128::from(self.nifp_off as u64) + i128::from(ofs);
        if off <= 0 || off >= region.len() as i128 {
            return Err(bad());
        }
        Ok(off as usize)
    }

    /// Offset of tx ring `i` (hardware rings first, then host rings).
    pub fn tx_ring_off(&self, region: &Region, i: u32) -> io::Result<usize> {
        if i >= self.tx_rings + self.host_tx_rings {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such netmap tx ring",
            ));
        }
        self.ring_off(region, i)
    }

    /// Offset of rx ring `i` (hardware rings first, then host rings).
    pub fn rx_ring_off(&self, region: &Region, i: u32) -> io::Result<usize> {
        if i >= self.rx_rings + self.host_rx_rings {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such netmap rx ring",
            ));
        }
        self.ring_off(region, self.tx_rings + self.host_tx_rings + i)
    }
}

/// A `/dev/netmap` fd registered to some rings of an interface, with its memory mapped.
pub struct Port {
    fd: Arc<OwnedFd>,
    region: Arc<Region>,
    req: NmReq,
    layout: InterfaceLayout,
    registration: Registration,
}

impl Port {
    /// Opens the device, registers `registration` on `ifname` and maps the memory.
    pub fn open(
        device: &NetmapDevice,
        ifname: &str,
        registration: Registration,
    ) -> io::Result<Port> {
        let fd = device.open()?;
        let mut req = nmreq::request(ifname, registration)?;
        nmreq::register(fd.as_fd(), &mut req).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("netmap register {ifname} {registration:?}: {e}"),
            )
        })?;
        let region = map_region(&fd, &req)?;
        let layout = InterfaceLayout::read(&region, req.nr_offset as usize)?;
        Ok(Port {
            fd: Arc::new(fd),
            region,
            req,
            layout,
            registration,
        })
    }

    /// Registers without mapping (the client end of a pipe: the client maps it).
    pub fn register_only(
        device: &NetmapDevice,
        ifname: &str,
        registration: Registration,
    ) -> io::Result<(OwnedFd, NmReq)> {
        let fd = device.open()?;
        let mut req = nmreq::request(ifname, registration)?;
        nmreq::register(fd.as_fd(), &mut req).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("netmap register {ifname} {registration:?}: {e}"),
            )
        })?;
        Ok((fd, req))
    }

    /// The request as the kernel returned it.
    pub fn request(&self) -> &NmReq {
        &self.req
    }

    /// The ring counts.
    pub fn layout(&self) -> InterfaceLayout {
        self.layout
    }

    /// The fd (shared with the rings).
    pub fn fd(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    /// Rx ring `i` (`rx_rings` is the first host ring) as a queue.
    pub fn rx(&self, i: u32) -> io::Result<NetmapRx<FdSync>> {
        let off = self.layout.rx_ring_off(&self.region, i)?;
        NetmapRx::new(self.region.clone(), off, FdSync(self.fd.clone()))
    }

    /// Tx ring `i` (`tx_rings` is the first host ring) as a queue.
    pub fn tx(&self, i: u32, zero_copy: bool) -> io::Result<NetmapTx<FdSync>> {
        let off = self.layout.tx_ring_off(&self.region, i)?;
        NetmapTx::new(self.region.clone(), off, FdSync(self.fd.clone()), zero_copy)
    }

    /// What this port is registered to.
    pub fn registration(&self) -> Registration {
        self.registration
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::netmap::memring::{MemRegion, MemRegionSpec};

    /// A `netmap_if` at offset 0 of a region with 2 hw + 1 host rings each way.
    #[test]
    fn interface_layout_finds_hardware_and_host_rings() {
        let mem = MemRegion::new(MemRegionSpec {
            ring_slots: vec![4; 7], // ring 0 is overwritten by the netmap_if
            buf_size: 2048,
            num_bufs: 40,
            mem_id: 1,
        })
        .unwrap();
        let region = mem.region();
        let nifp = 0;
        assert!(region.store_u32(nifp + offset_of!(netmap_if, ni_tx_rings), 2));
        assert!(region.store_u32(nifp + offset_of!(netmap_if, ni_rx_rings), 2));
        assert!(region.store_u32(nifp + NI_HOST_TX_RINGS, 1));
        assert!(region.store_u32(nifp + NI_HOST_RX_RINGS, 1));
        let ofs = nifp + offset_of!(netmap_if, ring_ofs);
        for entry in 0..6 {
            let ring = mem.ring_off(entry + 1) as i64;
            assert!(region.store_i64(ofs + entry * 8, ring - nifp as i64));
        }
        let layout = InterfaceLayout::read(&region, nifp).unwrap();
        assert_eq!((layout.tx_rings, layout.host_tx_rings), (2, 1));
        assert_eq!(layout.tx_ring_off(&region, 0).unwrap(), mem.ring_off(1));
        assert_eq!(
            layout.tx_ring_off(&region, 2).unwrap(),
            mem.ring_off(3),
            "host tx"
        );
        assert_eq!(layout.rx_ring_off(&region, 0).unwrap(), mem.ring_off(4));
        assert_eq!(
            layout.rx_ring_off(&region, 2).unwrap(),
            mem.ring_off(6),
            "host rx"
        );
        assert!(layout.rx_ring_off(&region, 3).is_err());
        // A corrupt offset pointing outside the region is refused.
        assert!(region.store_i64(ofs, i64::MAX));
        assert!(layout.tx_ring_off(&region, 0).is_err());
        // Absurd ring counts are refused.
        assert!(region.store_u32(nifp + offset_of!(netmap_if, ni_rx_rings), 1 << 20));
        assert!(InterfaceLayout::read(&region, nifp).is_err());
    }
}
