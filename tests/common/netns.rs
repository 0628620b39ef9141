//! Test helpers for network namespaces (self-contained; include with
//! `#[path = "common/netns.rs"] mod netns;`).
//!
//! - [`skip_unless_root`]: prints why and returns `true` when the test cannot run.
//! - [`Testbed`]: `tools/testbed up` with a unique prefix; `down` on drop (also on panic).
//! - [`in_netns`]: runs a closure on a fresh thread that entered a named namespace (the
//!   process and the test harness stay where they are), with a timeout.
//! - [`unique_prefix`]: short names unique per process and call.
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Whether the test must be skipped (not root, or no `ip`); prints the reason.
pub fn skip_unless_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping {test}: needs root (network namespaces)");
        return true;
    }
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("skipping {test}: the `ip` command is missing");
        return true;
    }
    false
}

/// A prefix unique to this process and call, short enough for interface and netns names.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{tag}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The `tools/testbed` script of this repository.
pub fn testbed_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tools/testbed")
}

/// One instance of the virtual lab (`tools/testbed`): namespaces `<prefix>-sw` (with `sw0`)
/// and `<prefix>-peer` (with `peer0`). Removed on drop.
pub struct Testbed {
    /// The prefix given to the script.
    pub prefix: String,
}

impl Testbed {
    /// Builds the lab with `queues` queues per veth end; panics with the script's output on
    /// failure (after cleaning up).
    pub fn up(prefix: &str, queues: usize) -> Testbed {
        let bed = Testbed {
            prefix: prefix.to_string(),
        };
        let out = Command::new(testbed_script())
            .args(["up", "--name", prefix, "--queues", &queues.to_string()])
            .output()
            .expect("running tools/testbed");
        assert!(
            out.status.success(),
            "tools/testbed up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        bed
    }

    /// The switch's namespace.
    pub fn sw(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// The peer's namespace.
    pub fn peer(&self) -> String {
        format!("{}-peer", self.prefix)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = Command::new(testbed_script())
            .args(["down", "--name", &self.prefix])
            .output();
    }
}

/// Runs `f` on a new thread inside network namespace `ns` (from `/run/netns`), waiting at most
/// `timeout`. Sockets, TAPs, `/proc/sys/net`, `/proc/thread-self/net` and commands spawned by
/// that thread all belong to `ns`. Panics in `f` are re-raised; a timeout panics.
pub fn in_netns<T, F>(ns: &str, timeout: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: `file` is an open namespace file; setns only changes this thread's network
        // namespace (CLONE_NEWNET is allowed in a multi-threaded process).
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(());
        result
    });
    match rx.recv_timeout(timeout) {
        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) | Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("in_netns({ns}) timed out after {timeout:?}")
        }
    }
}

/// Runs `ip ARGS` in the calling thread's namespace; panics with stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
