//! The control socket's OS side: binding, receiving one request with its sender, answering.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrLike, UnixAddr, UnixCredentials,
};

/// The most fds one `SCM_RIGHTS` message carries (the kernel's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;

/// Binds the daemon's control socket at `path`: removes a stale socket file left by a dead
/// daemon (but refuses to replace a live one or a file that is not a socket), sets mode 0770
/// and, with `group`, the group (`ALLOW_GID`). The socket is non-blocking and receives the
/// senders' credentials (`SO_PASSCRED`).
pub fn bind_control_socket(path: &Path, group: Option<u32>) -> io::Result<UnixDatagram> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            let probe = UnixDatagram::unbound()?;
            match probe.connect(path) {
                Ok(()) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{}: another daemon is bound there", path.display()),
                    ))
                }
                Err(_) => {
                    log::info!("removing stale control socket {}", path.display());
                    fs::remove_file(path)?;
                }
            }
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{}: exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let socket = UnixDatagram::bind(path)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o770))?;
    socket.set_nonblocking(true)?;
    setsockopt(&socket, sockopt::PassCred, &true).map_err(io::Error::from)?;
    // Room for large QueryUsedPorts answers (the kernel caps this at wmem_max).
    if let Err(e) = setsockopt(&socket, sockopt::SndBuf, &(1 << 20)) {
        log::debug!("control socket: SO_SNDBUF not raised: {e}");
    }
    Ok(socket)
}

/// Who sent a request.
#[derive(Clone, Debug)]
pub(crate) struct Sender {
    /// The sender's address, to answer to (a path or abstract); `None` for an unbound sender.
    pub(crate) addr: Option<UnixAddr>,
    /// The sending process (from `SCM_CREDENTIALS`), when the kernel told.
    pub(crate) pid: Option<i32>,
}

/// One received request datagram.
pub(crate) struct Received {
    /// Bytes received (at most the buffer's length).
    pub(crate) len: usize,
    /// The datagram was larger than the buffer.
    pub(crate) truncated: bool,
    /// The sender.
    pub(crate) sender: Sender,
}

/// Receives one datagram without blocking (`WouldBlock` when none is queued). Fds a sender
/// attached are closed at once.
pub(crate) fn recv_request(socket: &UnixDatagram, buf: &mut [u8]) -> io::Result<Received> {
    let mut cmsg = nix::cmsg_space!(UnixCredentials, [RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut pid = None;
    let mut stray_fds = Vec::new();
    // On MSG_CTRUNC the kernel installed no fd that did not fit (and cmsgs() refuses).
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            match c {
                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                ControlMessageOwned::ScmRights(fds) => stray_fds.extend(fds),
                _ => {}
            }
        }
    }
    for fd in stray_fds {
        log::warn!("control socket: closing an fd a client sent");
        // SAFETY: the kernel just installed `fd` for this SCM_RIGHTS message; we are its only
        // owner and close it by dropping.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    Ok(Received {
        len: msg.bytes,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        sender: Sender {
            addr: msg.address.filter(is_named),
            pid: pid.filter(|p| *p > 0),
        },
    })
}

/// Whether a received address names a sender (a path or an abstract name). Checked through
/// the length alone: nix's `UnixAddr` accessors (`path`, `is_unnamed`, `path_len`) panic on the
/// zero-length address the kernel reports for an unbound sender.
pub(crate) fn is_named(addr: &UnixAddr) -> bool {
    addr.len() as usize > std::mem::size_of::<libc::sa_family_t>()
}

/// Sends one answer datagram with `fds` attached, without blocking. Fails with `WouldBlock`
/// when the client's queue is full.
pub(crate) fn send_answer(
    socket: &UnixDatagram,
    to: &UnixAddr,
    bytes: &[u8],
    fds: &[RawFd],
) -> io::Result<()> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let sent = sendmsg(
        socket.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        Some(to),
    )
    .map_err(io::Error::from)?;
    if sent != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
    }
    Ok(())
}
