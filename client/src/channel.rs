//! A small packet-channel trait for client network stacks, with implementations for the
//! Unix-datagram channel ([`UdsChannel`]) and the shared-memory channel
//! ([`crate::shm::ShmClient`]).
//!
//! Both are non-blocking: `recv` returns `None` when nothing is pending and `send` returns
//! `false` when the channel is full (the frame is dropped, as a NIC would). A stack sleeps with
//! [`PacketChannel::wait`], or integrates [`PacketChannel::poll_fd`] into its own poll loop
//! (calling [`PacketChannel::prepare_poll`] first and [`PacketChannel::finish_poll`] after).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::shm::{poll_readable, ShmClient};

/// One raw Ethernet frame at a time between a client stack and the switch.
pub trait PacketChannel {
    /// Copies the next pending frame into `buf` (truncated to its length) and returns its
    /// length, or `None` when nothing is pending. Never blocks.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Sends one frame; `Ok(false)` when the channel is full and the frame was dropped.
    /// Never blocks.
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;

    /// The fd that becomes readable when frames arrive (after [`Self::prepare_poll`]).
    fn poll_fd(&self) -> BorrowedFd<'_>;

    /// Prepares to sleep on [`Self::poll_fd`]; returns `false` when frames are already pending
    /// (do not sleep then). Channels whose fd is always armed return `true`.
    fn prepare_poll(&mut self) -> bool {
        true
    }

    /// Ends a sleep started with [`Self::prepare_poll`].
    fn finish_poll(&mut self) {}

    /// Sleeps until frames may be pending or `timeout` passes (`None`: forever). Returns
    /// whether the channel became readable.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        if !self.prepare_poll() {
            return Ok(true);
        }
        let r = poll_readable(self.poll_fd(), timeout);
        self.finish_poll();
        r
    }
}

/// The client's end of the Unix-datagram channel (one frame per datagram, no header), as
/// received from the switch by SCM_RIGHTS in answer to `RequestUDS`.
#[derive(Debug)]
pub struct UdsChannel {
    fd: OwnedFd,
}

impl UdsChannel {
    /// Wraps the fd (the client's end of the switch's socketpair).
    pub fn new(fd: OwnedFd) -> UdsChannel {
        UdsChannel { fd }
    }

    /// Gives the fd back.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for UdsChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for UdsChannel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl PacketChannel for UdsChannel {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: receives at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        // SAFETY: sends `frame.len()` bytes from `frame`.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl PacketChannel for ShmClient {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        Ok(ShmClient::recv(self, buf))
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        Ok(ShmClient::send(self, frame))
    }

    fn poll_fd(&self) -> BorrowedFd<'_> {
        self.event_fd()
    }

    fn prepare_poll(&mut self) -> bool {
        self.prepare_wait()
    }

    fn finish_poll(&mut self) {
        self.finish_wait()
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<bool> {
        ShmClient::wait(self, timeout)
    }
}
