//! The virtual testbed for the daemon's end-to-end tests, driven through the shell: up with a
//! unique prefix, commands in either namespace, background processes killed on drop, and
//! `tools/testbed down` on drop (also on panic). Include with
//! `#[path = "common/testbed.rs"] mod testbed;` next to `common/shell.rs` as `mod shell`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use crate::shell::{root_dir, run};

/// `s` quoted for the inside of single quotes in a bash command line.
pub fn quote(s: &str) -> String {
    s.replace('\'', "'\\''")
}

/// A testbed instance (namespaces `<prefix>-sw` and `<prefix>-peer`), removed on drop.
pub struct Testbed {
    /// The namespaces' prefix, unique per process and call.
    pub prefix: String,
    /// A scratch directory for the daemon (control socket, state dir), removed on drop.
    pub dir: PathBuf,
}

impl Testbed {
    /// `tools/testbed up` with 4 queues and the veth's offloads `on` or `off`; `tag` starts
    /// the prefix (a few letters naming the test file).
    pub fn up(tag: &str, offloads: &str) -> Testbed {
        static N: AtomicUsize = AtomicUsize::new(0);
        let prefix = format!(
            "{tag}{}-{}",
            std::process::id() % 100000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("{prefix}-run"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let tb = Testbed { prefix, dir };
        let out = run(&format!(
            "{}/tools/testbed up --name {} --queues 4 --offloads {offloads}",
            root_dir().display(),
            tb.prefix
        ));
        assert!(
            out.status.success(),
            "testbed up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tb
    }

    /// The name of namespace `side` ("sw" or "peer").
    pub fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.prefix)
    }

    /// Runs a bash command line in namespace `side`.
    pub fn exec(&self, side: &str, cmd: &str) -> Output {
        run(&format!(
            "ip netns exec {} bash -c '{}'",
            self.ns(side),
            quote(cmd)
        ))
    }

    /// Runs a bash command line on the switch's host.
    pub fn sw(&self, cmd: &str) -> Output {
        self.exec("sw", cmd)
    }

    /// Runs a bash command line in the peer namespace.
    pub fn peer(&self, cmd: &str) -> Output {
        self.exec("peer", cmd)
    }

    /// Starts `cmd` in namespace `side` in the background, output discarded.
    pub fn spawn(&self, side: &str, cmd: &str) -> Background {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(side),
                "bash",
                "-c",
                &format!("exec {cmd}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        Background(child)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        let _ = run(&format!(
            "{}/tools/testbed down --name {}",
            root_dir().display(),
            self.prefix
        ));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A background process, killed on drop.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Testbed {
    /// The command that starts usnetd on the switch's host: a clean environment with
    /// INTERFACES=sw0, RUST_LOG=info, the control socket and state dir in [`Testbed::dir`],
    /// then `env`; stdin closed, stderr piped, stdout discarded (callers may change both).
    pub fn daemon_command(&self, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns("sw"),
            env!("CARGO_BIN_EXE_usnetd"),
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("INTERFACES", "sw0")
        .env("RUST_LOG", "info")
        .env("CONTROL_SOCKET", self.dir.join("ctl.sock"))
        .env("STATE_DIR", self.dir.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// Sends `sig` (e.g. "TERM") to a daemon started with [`Testbed::daemon_command`] and waits
/// (bounded, 20 s) for it to exit.
pub fn signal_and_wait(child: &mut Child, sig: &str) -> std::process::ExitStatus {
    // `ip netns exec` execs the daemon, so the child's pid is the daemon's.
    let _ = run(&format!("kill -{sig} {}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "usnetd did not exit after SIG{sig}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Kills `child` unless it has exited already, and reaps it.
pub fn kill_if_running(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Collects a child's output lines (echoed to stderr with a tag); `wait_for` waits (bounded)
/// for a line containing a text.
pub struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    new_line: mpsc::Receiver<()>,
}

impl Lines {
    /// Follows `out` on a thread of its own, each line echoed as `[tag] line`.
    pub fn follow(out: impl std::io::Read + Send + 'static, tag: String) -> Lines {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, new_line) = mpsc::channel();
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                l2.lock().unwrap().push(line);
                let _ = tx.send(());
            }
        });
        Lines { lines, new_line }
    }

    /// Every line so far, joined by newlines.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits at most `timeout` for a line containing `what`; whether it came.
    pub fn wait_for(&self, what: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lines.lock().unwrap().iter().any(|l| l.contains(what)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.new_line.recv_timeout(left) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                // The child closed its output: one last look.
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return self.lines.lock().unwrap().iter().any(|l| l.contains(what))
                }
            }
        }
    }
}

/// The daemon under test, started by [`Testbed::daemon_command`]; killed on drop.
pub struct Daemon {
    /// The daemon's process (`ip netns exec` execs it, so this is the daemon itself).
    pub child: Child,
    /// Its log (stderr).
    pub log: Lines,
}

impl Daemon {
    /// Starts the daemon with `env` and waits (bounded, 30 s) for its `ready` line; panics
    /// with the log otherwise.
    pub fn start(tb: &Testbed, env: &[(&str, &str)]) -> Daemon {
        let mut child = tb.daemon_command(env).spawn().expect("start usnetd");
        let log = Lines::follow(child.stderr.take().unwrap(), "usnetd".into());
        let mut d = Daemon { child, log };
        if !d.log.wait_for("ready", Duration::from_secs(30)) {
            kill_if_running(&mut d.child);
            panic!(
                "usnetd did not become ready within 30 s; log:\n{}",
                d.log.text()
            );
        }
        d
    }

    /// Sends `sig` (e.g. "TERM") and waits (bounded) for the exit: [`signal_and_wait`].
    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        signal_and_wait(&mut self.child, sig)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_if_running(&mut self.child);
    }
}
