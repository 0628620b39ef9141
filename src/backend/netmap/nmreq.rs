//! netmap's legacy registration request, `struct nmreq` (`NIOCGINFO`, `NIOCREGIF`).
//!
//! API: [`Registration`] (which rings: `netmap:IF-N`, `netmap:IF^`, `netmap:IF{N`,
//! `netmap:IF}N`), [`request`] (a filled `nmreq`), [`to_bytes`] (the raw bytes handed to
//! pipe clients: netmap's C layout, native endian), [`register`] and [`get_info`] (the ioctls).
//!
//! We speak the legacy API because clients expect its struct (PROTOCOL.md:
//! `RequestNetmapPipe` answers with the bytes of `struct nmreq`), and current netmap still
//! accepts it (`netmap_legacy.c` translates it). It needs `nr_version` >= 14 there, hence
//! [`LEGACY_API_VERSION`]; pre-2018 netmap (API 11..13) is not supported.

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, BorrowedFd};

use netmap_sys::netmap::{
    nmreq, IFNAMSIZ, NIOCGINFO, NIOCREGIF, NR_REG_ALL_NIC, NR_REG_ONE_NIC, NR_REG_PIPE_MASTER,
    NR_REG_PIPE_SLAVE, NR_REG_SW,
};

/// Size of the legacy `struct nmreq` (60 bytes).
pub const NMREQ_SIZE: usize = size_of::<nmreq>();
const _: () = assert!(NMREQ_SIZE == 60);

/// `nr_version` we put in requests: netmap API 14, the current one (its legacy path rejects
/// older versions).
pub const LEGACY_API_VERSION: u32 = 14;

/// The largest pipe id / ring number (`NETMAP_RING_MASK`).
pub const MAX_RING_ID: u16 = 0x0fff;

/// Which rings a file descriptor is bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// All hardware rings (`netmap:IF`): for `NIOCGINFO`.
    AllNic,
    /// One hardware ring pair (`netmap:IF-N`, `NR_REG_ONE_NIC`).
    OneNic(u16),
    /// The host (kernel) ring pair (`netmap:IF^`, `NR_REG_SW`).
    Host,
    /// The master end of pipe N (`netmap:IF{N`, `NR_REG_PIPE_MASTER`): the client's end.
    PipeMaster(u16),
    /// The slave end of pipe N (`netmap:IF}N`, `NR_REG_PIPE_SLAVE`): the switch's end.
    PipeSlave(u16),
}

impl Registration {
    /// `(nr_flags, nr_ringid)` as netmap's `nm_open` sets them for the port name.
    fn flags_ringid(self) -> io::Result<(u32, u16)> {
        let (flags, id) = match self {
            Registration::AllNic => (NR_REG_ALL_NIC, 0),
            Registration::OneNic(n) => (NR_REG_ONE_NIC, n),
            Registration::Host => (NR_REG_SW, 0),
            Registration::PipeMaster(n) => (NR_REG_PIPE_MASTER, n),
            Registration::PipeSlave(n) => (NR_REG_PIPE_SLAVE, n),
        };
        if id > MAX_RING_ID {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("netmap ring/pipe id {id} above {MAX_RING_ID}"),
            ));
        }
        Ok((flags, id))
    }
}

/// Checks that `ifname` is usable as `nr_name`: 1..=15 bytes, no NUL, no whitespace and none
/// of the characters netmap port names use as separators (`{}^@:/*`).
pub fn validate_ifname(ifname: &str) -> io::Result<()> {
    let ok = !ifname.is_empty()
        && ifname.len() < IFNAMSIZ
        && !ifname
            .bytes()
            .any(|b| b == 0 || b.is_ascii_whitespace() || b"{}^@:/*".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name for netmap: {ifname:?}"),
        ))
    }
}

/// A legacy request for `ifname` with `registration`, as `nm_open` would fill it (all other
/// fields zero: the kernel fills in sizes, offsets and the allocator id).
pub fn request(ifname: &str, registration: Registration) -> io::Result<nmreq> {
    validate_ifname(ifname)?;
    let (nr_flags, nr_ringid) = registration.flags_ringid()?;
    let mut nr_name = [0 as libc::c_char; IFNAMSIZ];
    for (dst, &b) in nr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = b as libc::c_char;
    }
    Ok(nmreq {
        nr_name,
        nr_version: LEGACY_API_VERSION,
        nr_offset: 0,
        nr_memsize: 0,
        nr_tx_slots: 0,
        nr_rx_slots: 0,
        nr_tx_rings: 0,
        nr_rx_rings: 0,
        nr_ringid,
        nr_cmd: 0,
        nr_arg1: 0,
        nr_arg2: 0,
        nr_arg3: 0,
        nr_flags,
        spare2: [0],
    })
}

/// The raw bytes of `req` in netmap's C layout (native endian), as clients read them.
pub fn to_bytes(req: &nmreq) -> [u8; NMREQ_SIZE] {
    let mut out = [0u8; NMREQ_SIZE];
    let mut put = |off: usize, bytes: &[u8]| out[off..off + bytes.len()].copy_from_slice(bytes);
    let name: Vec<u8> = req.nr_name.iter().map(|&c| c as u8).collect();
    put(offset_of!(nmreq, nr_name), &name);
    put(offset_of!(nmreq, nr_version), &req.nr_version.to_ne_bytes());
    put(offset_of!(nmreq, nr_offset), &req.nr_offset.to_ne_bytes());
    put(offset_of!(nmreq, nr_memsize), &req.nr_memsize.to_ne_bytes());
    put(
        offset_of!(nmreq, nr_tx_slots),
        &req.nr_tx_slots.to_ne_bytes(),
    );
    put(
        offset_of!(nmreq, nr_rx_slots),
        &req.nr_rx_slots.to_ne_bytes(),
    );
    put(
        offset_of!(nmreq, nr_tx_rings),
        &req.nr_tx_rings.to_ne_bytes(),
    );
    put(
        offset_of!(nmreq, nr_rx_rings),
        &req.nr_rx_rings.to_ne_bytes(),
    );
    put(offset_of!(nmreq, nr_ringid), &req.nr_ringid.to_ne_bytes());
    put(offset_of!(nmreq, nr_cmd), &req.nr_cmd.to_ne_bytes());
    put(offset_of!(nmreq, nr_arg1), &req.nr_arg1.to_ne_bytes());
    put(offset_of!(nmreq, nr_arg2), &req.nr_arg2.to_ne_bytes());
    put(offset_of!(nmreq, nr_arg3), &req.nr_arg3.to_ne_bytes());
    put(offset_of!(nmreq, nr_flags), &req.nr_flags.to_ne_bytes());
    put(offset_of!(nmreq, spare2), &req.spare2[0].to_ne_bytes());
    out
}

fn ioctl_req(
    fd: BorrowedFd<'_>,
    cmd: libc::c_ulong,
    name: &str,
    req: &mut nmreq,
) -> io::Result<()> {
    // SAFETY: NIOCREGIF/NIOCGINFO read and write exactly one struct nmreq (the size is
    // encoded in the request number and checked above: 60 bytes); `req` is a valid, exclusive
    // reference for the duration of the call; the fd is borrowed, hence open.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), cmd as _, req as *mut nmreq) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("ioctl({name}): {e}")));
    }
    Ok(())
}

/// `NIOCREGIF`: binds `fd` (an open `/dev/netmap`) to the rings `req` names; the kernel
/// fills in `nr_offset`, `nr_memsize`, ring and slot counts and `nr_arg2` (allocator id).
pub fn register(fd: BorrowedFd<'_>, req: &mut nmreq) -> io::Result<()> {
    ioctl_req(fd, NIOCREGIF, "NIOCREGIF", req)
}

/// `NIOCGINFO`: ring counts and memory size of `ifname`, without binding.
pub fn get_info(fd: BorrowedFd<'_>, ifname: &str) -> io::Result<nmreq> {
    let mut req = request(ifname, Registration::AllNic)?;
    ioctl_req(fd, NIOCGINFO, "NIOCGINFO", &mut req)?;
    Ok(req)
}

/// The interface name in `req` (up to the first NUL).
pub fn name(req: &nmreq) -> String {
    req.nr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect()
}
