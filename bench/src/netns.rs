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

/// The `tx_dropped` counter of `ifname` in the calling thread's network namespace (from
/// `/proc/thread-self/net/dev`, which follows the thread's namespace). A veth counts there
/// the frames its peer could not take (full backlog or XDP ring) that no socket saw refused.
pub fn tx_dropped(ifname: &str) -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/dev")?;
    parse_tx_dropped(&text, ifname).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{ifname} not in /proc/net/dev"),
        )
    })
}

/// The transmit `drop` column of `ifname`'s line in a `/proc/net/dev` text.
fn parse_tx_dropped(text: &str, ifname: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, fields) = line.split_once(':')?;
        if name.trim() != ifname {
            return None;
        }
        // Receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes
        // packets errs drop ...
        fields.split_whitespace().nth(11)?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_dropped_column() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes ...\n    lo: 1 2 0 0 0 0 0 0 1 2 0 0 0 0 0 0\n  peer0: 100 5 0 1 0 0 0 0 6400 100 0 42 0 0 0 0\n";
        assert_eq!(parse_tx_dropped(text, "peer0"), Some(42));
        assert_eq!(parse_tx_dropped(text, "lo"), Some(0));
        assert_eq!(parse_tx_dropped(text, "eth0"), None);
    }
}
