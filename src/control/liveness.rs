//! Noticing that a client's process (or thread) exited: a pidfd that becomes readable, or,
//! where pidfd_open is not available, `/proc/PID` checked every second.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;

/// `PIDFD_THREAD` (Linux 6.9+): a pidfd for a thread that is not a thread-group leader.
const PIDFD_THREAD: libc::c_uint = libc::O_EXCL as libc::c_uint;

/// How the liveness of one process or thread is watched.
#[derive(Debug)]
pub(crate) enum Watch {
    /// Readable (`POLLIN`) once the process exited.
    Pidfd(OwnedFd),
    /// Gone once `/proc/PID` no longer exists.
    Proc(i32),
}

impl Watch {
    /// Starts watching `pid`. `None` when no such process or thread exists.
    pub(crate) fn new(pid: i32) -> Option<Watch> {
        if pid <= 0 {
            return None;
        }
        match pidfd_open(pid, 0) {
            Ok(fd) => return Some(Watch::Pidfd(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return None,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // Not a thread-group leader: a thread id.
                if let Ok(fd) = pidfd_open(pid, PIDFD_THREAD) {
                    return Some(Watch::Pidfd(fd));
                }
            }
            Err(_) => {}
        }
        proc_exists(pid).then_some(Watch::Proc(pid))
    }

    /// For [`Watch::Proc`]: whether the process is gone. A pidfd is polled instead.
    pub(crate) fn proc_gone(&self) -> bool {
        match self {
            Watch::Pidfd(_) => false,
            Watch::Proc(pid) => !proc_exists(*pid),
        }
    }
}

/// Whether `/proc/PID` exists (also for thread ids).
pub(crate) fn proc_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn pidfd_open(pid: i32, flags: libc::c_uint) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes two integers and returns a new fd or -1; no memory is shared.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, flags) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the syscall returned a fresh fd (close-on-exec) owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_watched_and_bogus_pids_are_not() {
        assert!(Watch::new(std::process::id() as i32).is_some());
        assert!(Watch::new(0).is_none());
        assert!(Watch::new(-5).is_none());
        // pid_max is at most 2^22, so this pid never exists.
        assert!(Watch::new(i32::MAX).is_none());
    }

    #[test]
    fn proc_fallback_notices_exit() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let watch = Watch::Proc(child.id() as i32);
        assert!(!watch.proc_gone());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(watch.proc_gone());
    }
}
