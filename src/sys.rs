//! Small safe wrappers around system calls the daemon's own code needs.

use std::time::Duration;

use usnetd_shards::worker::IdleWait;

/// [`IdleWait`] with `poll(2)`: an idle worker sleeps until one of its queues' file
/// descriptors is readable.
#[derive(Default)]
pub struct PollWaiter {
    fds: Vec<libc::pollfd>,
}

impl IdleWait for PollWaiter {
    fn wait(&mut self, fds: &[i32], timeout: Duration) {
        self.fds.clear();
        self.fds.extend(fds.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `self.fds` is a valid array of `self.fds.len()` pollfd structs for the whole
        // call; poll only writes their `revents`. Closed or bad fds are reported in revents
        // (POLLNVAL), not undefined behaviour.
        let _ = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, ms) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn wakes_when_an_fd_is_readable() {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(b"x").unwrap();
        let mut w = PollWaiter::default();
        // Readable already: returns at once instead of after the (one hour) timeout.
        w.wait(&[b.as_raw_fd()], Duration::from_secs(3600));
        assert_eq!(w.fds[0].revents & libc::POLLIN, libc::POLLIN);
    }
}
