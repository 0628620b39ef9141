//! The kernel's listening TCP sockets through `NETLINK_SOCK_DIAG` (inet_diag).
//!
//! Reading `/proc/net/tcp` walks the kernel's whole established-connection hash table on every
//! `read(2)` (milliseconds on a machine with much memory), which made each AddMatch slow. A
//! sock_diag dump restricted to the LISTEN state walks only the listening hash.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};
use usnetd_shards::key::Ip;

/// `SOCK_DIAG_BY_FAMILY`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states (u32), `inet_diag_sockid`.
const REQ_LEN: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid (48), expires, rqueue,
/// wqueue, uid, inode.
const MSG_LEN: usize = 72;
const TCP_LISTEN_STATE_BIT: u32 = 1 << 10;

/// The request for one address family's listening TCP sockets.
fn request(family: u8, seq: u32) -> [u8; NLMSG_HDR + REQ_LEN] {
    let mut m = [0u8; NLMSG_HDR + REQ_LEN];
    m[0..4].copy_from_slice(&((NLMSG_HDR + REQ_LEN) as u32).to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m[16] = family;
    m[17] = libc::IPPROTO_TCP as u8;
    m[20..24].copy_from_slice(&TCP_LISTEN_STATE_BIT.to_ne_bytes());
    m
}

/// Parses one receive buffer of a dump; returns whether the dump is complete.
fn parse(buf: &[u8], out: &mut Vec<(Ip, u16)>) -> io::Result<bool> {
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().expect("2 bytes"));
        if len < NLMSG_HDR || off + len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "sock_diag: bad message length",
            ));
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let code = buf
                    .get(off + NLMSG_HDR..off + NLMSG_HDR + 4)
                    .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                    .unwrap_or(0);
                return Err(io::Error::from_raw_os_error(-code));
            }
            SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDR + MSG_LEN => {
                let m = &buf[off + NLMSG_HDR..off + len];
                let family = m[0];
                // inet_diag_sockid at 4: sport (be16), dport, src[16], dst[16], ...
                let port = u16::from_be_bytes([m[4], m[5]]);
                let src: [u8; 16] = m[8..24].try_into().expect("16 bytes");
                let ip = if i32::from(family) == libc::AF_INET {
                    Ip::v4([src[0], src[1], src[2], src[3]])
                } else {
                    Ip::v6(src)
                };
                out.push((ip, port));
            }
            _ => {}
        }
        off += (len + 3) & !3;
    }
    Ok(false)
}

/// The (local address, port) of every listening TCP socket of this network namespace,
/// IPv4 and IPv6. The any address is `0.0.0.0` (IPv4-mapped) or `::`.
pub fn tcp_listeners() -> io::Result<Vec<(Ip, u16)>> {
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .map_err(|e| io::Error::other(format!("socket(NETLINK_SOCK_DIAG): {e}")))?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    for (seq, family) in [(1u32, libc::AF_INET as u8), (2, libc::AF_INET6 as u8)] {
        send(fd.as_raw_fd(), &request(family, seq), MsgFlags::empty())
            .map_err(|e| io::Error::other(format!("sock_diag send: {e}")))?;
        loop {
            let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .map_err(|e| io::Error::other(format!("sock_diag recv: {e}")))?;
            if n == 0 || parse(&buf[..n], &mut out)? {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn request_layout() {
        let r = request(libc::AF_INET as u8, 7);
        assert_eq!(u32::from_ne_bytes(r[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(r[4..6].try_into().unwrap()), 20);
        assert_eq!(r[16], libc::AF_INET as u8);
        assert_eq!(r[17], 6);
        assert_eq!(u32::from_ne_bytes(r[20..24].try_into().unwrap()), 1 << 10);
    }

    #[test]
    fn parse_rejects_truncated_messages() {
        let mut m = vec![0u8; 20];
        m[0..4].copy_from_slice(&100u32.to_ne_bytes());
        assert!(parse(&m, &mut Vec::new()).is_err());
    }

    #[test]
    fn finds_a_listener_of_this_process() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let found = tcp_listeners().unwrap();
        assert!(
            found.contains(&(Ip::v4([127, 0, 0, 1]), port)),
            "{port} not in {found:?}"
        );
    }
}
