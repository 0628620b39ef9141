//! # usnetd-client: talk to the usnetd control socket
//!
//! [`protocol`] holds the wire types (byte-compatible with the original usnetd); [`Client`] is
//! a small blocking client: it binds its own socket path (its identity towards the daemon),
//! sends one request per datagram, and reads the answer with a timeout, checking that it comes
//! from the control socket's path. Packet channels come back as raw file descriptors; the
//! channel implementations (Unix datagram socket, shared-memory rings) are built on top.
//!
//! ```no_run
//! use usnetd_client::{protocol::{UsnetMatch, WireIp}, Client};
//! let client = Client::connect("/run/usnetd.socket", "/run/user/1000/usnet-client-1")?;
//! let channel = client.request_uds("eth0", std::process::id() as i32)?;
//! let ok = client.add_match(&UsnetMatch {
//!     dst_addr: WireIp::Ipv4("10.0.0.2".parse().unwrap()),
//!     dst_port: Some(8080),
//!     src_addr: None,
//!     src_port: None,
//!     protocol: 6,
//! })?;
//! # let _ = (channel, ok);
//! # Ok::<(), std::io::Error>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

// The packet channels need `unsafe` for fd I/O and the shared-memory mapping; every block
// has a SAFETY comment.
#[allow(unsafe_code)]
pub mod channel;
pub mod protocol;
#[allow(unsafe_code)]
pub mod shm;

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags, SockaddrLike, UnixAddr};

use protocol::{
    ControlAnswer, ControlMessage, ShmChannelInfo, UsedPorts, UsnetMatch, ANSWER_ERR, ANSWER_FD,
    ANSWER_OK, MAX_ANSWER_LEN,
};

/// The most fds one `SCM_RIGHTS` message can carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// How long a client waits for an answer by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A datagram received from the daemon with the fds it carried.
struct Answer {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

/// A connection to the usnetd control socket from a bound client socket path.
pub struct Client {
    socket: UnixDatagram,
    control_path: PathBuf,
    own_path: PathBuf,
}

impl Client {
    /// Binds `own_path` (which must not exist) and prepares to talk to the daemon at
    /// `control_path`. Answers must come from exactly that path (spell it as the daemon bound
    /// it). Waits at most [`DEFAULT_TIMEOUT`] for each answer.
    pub fn connect(
        control_path: impl AsRef<Path>,
        own_path: impl AsRef<Path>,
    ) -> io::Result<Client> {
        let socket = UnixDatagram::bind(own_path.as_ref())?;
        let client = Client {
            socket,
            control_path: control_path.as_ref().to_path_buf(),
            own_path: own_path.as_ref().to_path_buf(),
        };
        client.set_timeout(DEFAULT_TIMEOUT)?;
        Ok(client)
    }

    /// Sets how long to wait for each answer (`SO_RCVTIMEO`); must not be zero.
    pub fn set_timeout(&self, timeout: Duration) -> io::Result<()> {
        if timeout.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a zero timeout would block forever",
            ));
        }
        self.socket.set_read_timeout(Some(timeout))
    }

    /// The client's own socket path (its identity towards the daemon).
    pub fn own_path(&self) -> &Path {
        &self.own_path
    }

    /// Asks for a Unix datagram socket channel on `interface`; returns the client's end (one
    /// raw Ethernet frame per datagram).
    pub fn request_uds(&self, interface: &str, pid: i32) -> io::Result<OwnedFd> {
        let answer = self.request(&ControlMessage::RequestUDS(interface.into(), pid))?;
        if answer.bytes == ANSWER_FD && answer.fds.len() == 1 {
            Ok(answer.fds.into_iter().next().expect("one fd"))
        } else {
            Err(refused("RequestUDS", &answer.bytes))
        }
    }

    /// Asks for a shared-memory ring channel on `interface` (extension); returns its parameters
    /// and fds (memfd first, then the eventfds; see [`protocol`]).
    pub fn request_shm(
        &self,
        interface: &str,
        pid: i32,
    ) -> io::Result<(ShmChannelInfo, Vec<OwnedFd>)> {
        let answer = self.request(&ControlMessage::RequestShm(interface.into(), pid))?;
        match serde_json::from_slice::<ControlAnswer>(&answer.bytes) {
            Ok(ControlAnswer::ShmChannel(info)) if !answer.fds.is_empty() => Ok((info, answer.fds)),
            _ => Err(refused("RequestShm", &answer.bytes)),
        }
    }

    /// Registers a rule for this client's channel; `Ok(false)` when the daemon refused it
    /// (`ER`: taken, not allowed, or no channel yet).
    pub fn add_match(&self, rule: &UsnetMatch) -> io::Result<bool> {
        let answer = self.request(&ControlMessage::AddMatch(*rule))?;
        match &answer.bytes[..] {
            ANSWER_OK => Ok(true),
            ANSWER_ERR => Ok(false),
            other => Err(refused("AddMatch", other)),
        }
    }

    /// Removes one of this client's rules (no answer).
    pub fn remove_match(&self, rule: &UsnetMatch) -> io::Result<()> {
        self.send(&ControlMessage::RemoveMatch(*rule))
    }

    /// Asks for all local ports in use.
    pub fn query_used_ports(&self) -> io::Result<UsedPorts> {
        let answer = self.request(&ControlMessage::QueryUsedPorts)?;
        match serde_json::from_slice::<ControlAnswer>(&answer.bytes) {
            Ok(ControlAnswer::QueryUsedPortsAnswer(ports)) => Ok(ports),
            _ => Err(refused("QueryUsedPorts", &answer.bytes)),
        }
    }

    /// Tells the daemon to remove this client with all its channels and rules (no answer).
    pub fn delete_client(&self) -> io::Result<()> {
        self.send(&ControlMessage::DeleteClient)
    }

    /// Sends a request without answer.
    fn send(&self, msg: &ControlMessage) -> io::Result<()> {
        let json = msg.to_json();
        let sent = self.socket.send_to(json.as_bytes(), &self.control_path)?;
        if sent != json.len() {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
        }
        Ok(())
    }

    /// Sends a request and waits for its answer (from the control path only).
    fn request(&self, msg: &ControlMessage) -> io::Result<Answer> {
        self.drain_stale()?;
        self.send(msg)?;
        loop {
            let (answer, from) = self.recv(MsgFlags::empty())?;
            if from.as_deref() == Some(self.control_path.as_path()) {
                return Ok(answer);
            }
            // Not from the daemon: ignore it (its fds are closed on drop) and keep waiting.
        }
    }

    /// Throws away datagrams that arrived after an earlier request timed out, so they are not
    /// taken for the answer to the next request.
    fn drain_stale(&self) -> io::Result<()> {
        loop {
            match self.recv(MsgFlags::MSG_DONTWAIT) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Receives one datagram with its fds and sender path.
    fn recv(&self, flags: MsgFlags) -> io::Result<(Answer, Option<PathBuf>)> {
        let mut buf = vec![0u8; MAX_ANSWER_LEN];
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let (len, from, raw_fds, truncated) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<UnixAddr>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                flags | MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(io::Error::from)?;
            let mut raw_fds = Vec::new();
            // On MSG_CTRUNC the kernel installed no fd that did not fit; nothing to close then.
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        raw_fds.extend(fds);
                    }
                }
            }
            let from = msg
                .address
                .as_ref()
                // Length first: nix's accessors panic on an unbound sender's empty address.
                .filter(|a| a.len() as usize > std::mem::size_of::<libc::sa_family_t>())
                .and_then(|a| a.path())
                .map(Path::to_path_buf);
            (
                msg.bytes,
                from,
                raw_fds,
                msg.flags.contains(MsgFlags::MSG_TRUNC),
            )
        };
        let fds = raw_fds.into_iter().map(owned_fd).collect();
        if truncated {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer larger than the receive buffer",
            ));
        }
        buf.truncate(len);
        Ok((Answer { bytes: buf, fds }, from))
    }
}

/// Takes ownership of an fd received by `SCM_RIGHTS`.
#[allow(unsafe_code)]
fn owned_fd(fd: RawFd) -> OwnedFd {
    // SAFETY: the kernel just installed `fd` in our table for this SCM_RIGHTS message; nothing
    // else refers to it, so we are its only owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn refused(what: &str, answer: &[u8]) -> io::Error {
    if answer == ANSWER_ERR {
        io::Error::other(format!("{what}: refused by usnetd (ER)"))
    } else {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: unexpected answer of {} bytes", answer.len()),
        )
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.own_path);
    }
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`) to the socket bound at `to`. Used by the
/// daemon for its answers and by tests.
pub fn send_with_fds(
    socket: &UnixDatagram,
    to: &Path,
    bytes: &[u8],
    fds: &[RawFd],
) -> io::Result<usize> {
    let addr = UnixAddr::new(to).map_err(io::Error::from)?;
    let iov = [IoSlice::new(bytes)];
    let cmsgs = [nix::sys::socket::ControlMessage::ScmRights(fds)];
    let cmsgs: &[nix::sys::socket::ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    sendmsg(
        socket.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT,
        Some(&addr),
    )
    .map_err(io::Error::from)
}
