//! Small safe wrappers around system calls the daemon's own code needs.

use std::io;
use std::time::Duration;

use usnetd_shards::worker::IdleWait;

/// How the kernel schedules the switch's worker threads (WORKER_SCHED).
///
/// A worker sleeps in `poll(2)` when its queues are empty; what decides its latency on a core
/// it shares with other threads is how soon the scheduler runs it once a frame wakes it. With
/// the default policy a woken worker may wait for the running thread's time slice (a few
/// milliseconds under EEVDF) behind a busy application on its core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerSched {
    /// The default policy (SCHED_OTHER) with the default time slice.
    Normal,
    /// SCHED_OTHER asking EEVDF for this (shorter) slice (`sched_attr.sched_runtime`, Linux
    /// 6.12 and later): a woken worker with a short slice gets an earlier deadline and
    /// preempts a thread with the default slice, yet never holds its core longer than a fair
    /// share.
    Slice(Duration),
    /// SCHED_FIFO at this priority (1-99): a woken worker preempts every normal thread at
    /// once. Under overload it holds its core until the kernel's real-time throttling
    /// (`kernel.sched_rt_runtime_us`, 95% by default) lets other threads run.
    Fifo(u8),
}

impl WorkerSched {
    /// Parses the setting's value: `normal`, `slice:MICROSECONDS` (100-100000) or
    /// `fifo:PRIORITY` (1-99).
    pub fn parse(s: &str) -> Result<WorkerSched, String> {
        let s = s.trim();
        let (kind, arg) = match s.split_once(':') {
            Some((k, a)) => (k, Some(a.trim())),
            None => (s, None),
        };
        match (kind, arg) {
            ("" | "normal", None) => Ok(WorkerSched::Normal),
            ("slice", Some(a)) => match a.parse::<u64>() {
                Ok(us @ 100..=100_000) => Ok(WorkerSched::Slice(Duration::from_micros(us))),
                _ => Err(format!(
                    "slice needs microseconds from 100 to 100000, got '{a}'"
                )),
            },
            ("fifo", Some(a)) => match a.parse::<u8>() {
                Ok(p @ 1..=99) => Ok(WorkerSched::Fifo(p)),
                _ => Err(format!("fifo needs a priority from 1 to 99, got '{a}'")),
            },
            _ => Err(format!(
                "expected normal, slice:MICROSECONDS or fifo:PRIORITY, got '{s}'"
            )),
        }
    }

    /// Applies the policy to the calling thread.
    pub fn apply_to_current_thread(self) -> io::Result<()> {
        let (policy, priority, runtime_ns) = match self {
            WorkerSched::Normal => return Ok(()),
            WorkerSched::Slice(d) => (libc::SCHED_OTHER, 0, d.as_nanos() as u64),
            WorkerSched::Fifo(p) => (libc::SCHED_FIFO, u32::from(p), 0),
        };
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            sched_policy: policy as u32,
            sched_flags: 0,
            sched_nice: 0,
            sched_priority: priority,
            sched_runtime: runtime_ns,
            sched_deadline: 0,
            sched_period: 0,
        };
        // SAFETY: sched_setattr(2) reads `attr.size` bytes from a valid, initialized
        // `struct sched_attr` (the kernel's layout, version 0: 48 bytes) that outlives the
        // call; pid 0 is the calling thread; flags 0. It writes nothing to our memory.
        let rc =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl std::fmt::Display for WorkerSched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerSched::Normal => write!(f, "normal"),
            WorkerSched::Slice(d) => write!(f, "slice:{}", d.as_micros()),
            WorkerSched::Fifo(p) => write!(f, "fifo:{p}"),
        }
    }
}

/// The kernel's `struct sched_attr` (include/uapi/linux/sched/types.h, version 0).
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

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
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: `self.fds` is a valid array of `self.fds.len()` pollfd structs for the whole
        // call (a dangling but unused pointer when empty: ppoll reads none); ppoll only writes
        // their `revents` and reads `timeout`, a valid timespec on the stack; a null signal
        // mask leaves the mask alone. Closed or bad fds are reported in revents (POLLNVAL),
        // not undefined behaviour.
        let _ = unsafe {
            libc::ppoll(
                self.fds.as_mut_ptr(),
                self.fds.len() as libc::nfds_t,
                &timeout,
                std::ptr::null(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn worker_sched_values() {
        assert_eq!(WorkerSched::parse("normal"), Ok(WorkerSched::Normal));
        assert_eq!(WorkerSched::parse(""), Ok(WorkerSched::Normal));
        assert_eq!(
            WorkerSched::parse("slice:200"),
            Ok(WorkerSched::Slice(Duration::from_micros(200)))
        );
        assert_eq!(WorkerSched::parse(" fifo:10 "), Ok(WorkerSched::Fifo(10)));
        for bad in [
            "fifo",
            "fifo:0",
            "fifo:100",
            "fifo:x",
            "slice",
            "slice:99",
            "slice:100001",
            "normal:1",
            "rr:5",
            "fast",
        ] {
            assert!(WorkerSched::parse(bad).is_err(), "{bad} accepted");
        }
        for v in ["normal", "slice:250", "fifo:42"] {
            assert_eq!(WorkerSched::parse(v).unwrap().to_string(), v);
        }
    }

    #[test]
    fn sched_attr_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<SchedAttr>(), 48); // SCHED_ATTR_SIZE_VER0
    }

    #[test]
    fn a_slice_applies_to_a_thread() {
        // Any thread may shorten its own slice (no privilege needed); kernels before 6.12
        // ignore the runtime of a SCHED_OTHER thread, which also succeeds.
        std::thread::spawn(|| {
            WorkerSched::Slice(Duration::from_micros(500))
                .apply_to_current_thread()
                .unwrap();
            WorkerSched::Normal.apply_to_current_thread().unwrap();
        })
        .join()
        .unwrap();
    }

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
