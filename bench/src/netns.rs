//! Entering a network namespace and reading an interface's MAC address from inside it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Moves the calling thread into the named network namespace (`/run/netns/NAME`, as created
/// by `ip netns add`). Threads spawned afterwards by this thread start in it too; sockets keep
/// the namespace they were created in.
pub fn enter(name: &str) -> io::Result<()> {
    let path = if name.contains('/') {
        name.to_string()
    } else {
        format!("/run/netns/{name}")
    };
    let file = File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))?;
    // SAFETY: setns on a namespace fd we hold open; it only changes this thread's namespace.
    let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns({path}): {e}")));
    }
    Ok(())
}

/// The MAC address of `ifname` in the calling thread's network namespace (by ioctl, so it
/// works after [`enter`] without remounting /sys).
pub fn hw_addr(ifname: &str) -> io::Result<[u8; 6]> {
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    // SAFETY: plain socket(2) call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and writes ifru_hwaddr inside `req`.
    let r = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) };
    let err = io::Error::last_os_error();
    // SAFETY: closing the fd we opened above.
    unsafe { libc::close(fd) };
    if r < 0 {
        return Err(io::Error::new(err.kind(), format!("{ifname}: {err}")));
    }
    // SAFETY: after a successful SIOCGIFHWADDR the hwaddr member of the union is set.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok(mac)
}
