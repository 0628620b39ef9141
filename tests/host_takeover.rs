//! Takeover of a NIC's addresses and routes by the TAP, restore, and repair after a crash.
//! Needs root (network namespaces built by tools/testbed); skipped otherwise.

#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use usnetd::host::takeover::{self, ip_json, link_exists, normalized_view};
use usnetd::host::{HostConfig, HostKernel};

const TIMEOUT: Duration = Duration::from_secs(60);

fn state_dir(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("usnetd-state-{prefix}"))
}

fn config(prefix: &str) -> HostConfig {
    let mut c = HostConfig::new("sw0");
    c.queues = 2;
    c.state_dir = state_dir(prefix);
    // The test thread's /sys is not the test namespace's: RPS cannot be set and must not
    // keep the takeover from working.
    c.rps_cores = vec![0];
    c
}

fn routes(dev: &str) -> Vec<Value> {
    let mut all = Vec::new();
    for flag in ["-4", "-6"] {
        let list = ip_json(&[flag, "route", "show", "dev", dev, "table", "all"]).unwrap();
        all.extend(list.as_array().unwrap().iter().cloned());
    }
    all
}

/// Routes outside the `local` table.
fn moved_routes(dev: &str) -> Vec<Value> {
    routes(dev)
        .into_iter()
        .filter(|r| r.get("table").and_then(Value::as_str) != Some("local"))
        .collect()
}

fn has_route(list: &[Value], dst: &str, gateway: Option<&str>) -> bool {
    list.iter().any(|r| {
        r.get("dst").and_then(Value::as_str) == Some(dst)
            && r.get("gateway").and_then(Value::as_str) == gateway
    })
}

fn sysctl(path: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .unwrap()
        .trim()
        .to_string()
}

/// Checks that the TAP carries the NIC's identity and routes, and the NIC has none left.
fn assert_taken_over(tap: &str) {
    let nic_link = &ip_json(&["link", "show", "dev", "sw0"]).unwrap()[0];
    let tap_link = &ip_json(&["link", "show", "dev", tap]).unwrap()[0];
    assert_eq!(tap_link["address"], nic_link["address"]);
    assert_eq!(tap_link["mtu"], nic_link["mtu"]);
    let flags = tap_link["flags"].as_array().unwrap();
    assert!(
        flags.iter().any(|f| f == "UP"),
        "{tap} is not up: {tap_link}"
    );

    let addrs = &ip_json(&["addr", "show", "dev", tap]).unwrap()[0]["addr_info"];
    let has_addr = |local: &str, len: u64| {
        addrs
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["local"] == local && a["prefixlen"] == len)
    };
    assert!(has_addr("10.77.0.2", 24), "{addrs}");
    assert!(has_addr("fd77::2", 64), "{addrs}");
    // The NIC keeps its addresses.
    let nic_addrs = &ip_json(&["addr", "show", "dev", "sw0"]).unwrap()[0]["addr_info"];
    assert!(nic_addrs.to_string().contains("10.77.0.2"));

    let tap_routes = moved_routes(tap);
    assert!(
        has_route(&tap_routes, "default", Some("10.77.0.1")),
        "{tap_routes:?}"
    );
    assert!(
        has_route(&tap_routes, "10.77.0.0/24", None),
        "{tap_routes:?}"
    );
    assert!(has_route(&tap_routes, "fd77::/64", None), "{tap_routes:?}");
    assert!(
        has_route(&tap_routes, "default", Some("fd77::1")),
        "{tap_routes:?}"
    );
    assert_eq!(moved_routes("sw0"), Vec::<Value>::new());

    // The kernel now sends through the TAP.
    let get = takeover::ip(&["route", "get", "10.77.0.1"]).unwrap();
    assert!(get.contains(&format!("dev {tap}")), "{get}");
    let get = takeover::ip(&["route", "get", "192.0.2.1"]).unwrap();
    assert!(get.contains(&format!("dev {tap}")), "{get}");

    assert_eq!(sysctl("net/ipv4/conf/sw0/arp_ignore"), "8");
    assert_eq!(sysctl("net/ipv4/conf/sw0/arp_announce"), "2");
}

#[test]
fn host_takeover_then_restore_is_exact() {
    if netns::skip_unless_root("host_takeover_then_restore_is_exact") {
        return;
    }
    let prefix = netns::unique_prefix("uht");
    let bed = netns::Testbed::up(&prefix, 2);
    let cfg = config(&prefix);
    netns::in_netns(&bed.sw(), TIMEOUT, move || {
        let before = normalized_view("sw0").unwrap();
        let ignore_before = sysctl("net/ipv4/conf/sw0/arp_ignore");
        let mut host = HostKernel::start(&cfg).unwrap();
        let tap = host.tap().name().to_string();
        assert_eq!(tap, "sw0usnetd");
        assert_eq!(host.tap().queue_count(), 2);
        let state_file = cfg.takeover_config().state_file();
        assert!(
            state_file.exists(),
            "no state file {}",
            state_file.display()
        );
        assert_taken_over(&tap);
        // Nothing moved back again.
        assert_eq!(host.takeover().reassert().unwrap(), 0);

        host.restore().unwrap();
        assert!(!link_exists(&tap));
        assert!(!state_file.exists());
        assert_eq!(normalized_view("sw0").unwrap(), before);
        assert_eq!(sysctl("net/ipv4/conf/sw0/arp_ignore"), ignore_before);
        // Idempotent, also from Drop.
        host.restore().unwrap();
        drop(host);
        assert_eq!(normalized_view("sw0").unwrap(), before);

        // The Drop guard alone restores too.
        let host = HostKernel::start(&cfg).unwrap();
        assert_taken_over(host.tap().name());
        drop(host);
        assert!(!link_exists(&tap));
        assert_eq!(normalized_view("sw0").unwrap(), before);
    });
    let _ = std::fs::remove_dir_all(state_dir(&prefix));
}

#[test]
fn host_reassert_moves_recreated_prefix_routes() {
    if netns::skip_unless_root("host_reassert_moves_recreated_prefix_routes") {
        return;
    }
    let prefix = netns::unique_prefix("uhr");
    let bed = netns::Testbed::up(&prefix, 1);
    let cfg = config(&prefix);
    netns::in_netns(&bed.sw(), TIMEOUT, move || {
        let host = HostKernel::start(&cfg).unwrap();
        // What the kernel does on a link flap: the prefix route comes back on the NIC (the
        // kernel appends it next to the one on the TAP).
        takeover::ip(&[
            "route",
            "append",
            "10.77.0.0/24",
            "dev",
            "sw0",
            "proto",
            "kernel",
            "scope",
            "link",
            "src",
            "10.77.0.2",
        ])
        .unwrap();
        assert_eq!(moved_routes("sw0").len(), 1);
        assert_eq!(host.takeover().reassert().unwrap(), 1);
        assert_eq!(moved_routes("sw0"), Vec::<Value>::new());
        assert!(has_route(
            &moved_routes(host.tap().name()),
            "10.77.0.0/24",
            None
        ));
    });
    let _ = std::fs::remove_dir_all(state_dir(&prefix));
}

#[test]
fn host_repair_after_forgotten_guard() {
    if netns::skip_unless_root("host_repair_after_forgotten_guard") {
        return;
    }
    let prefix = netns::unique_prefix("uhf");
    let bed = netns::Testbed::up(&prefix, 2);
    let cfg = config(&prefix);
    netns::in_netns(&bed.sw(), TIMEOUT, move || {
        let tcfg = cfg.takeover_config();
        let before = normalized_view("sw0").unwrap();
        assert!(!takeover::repair(&tcfg).unwrap().found_leftovers());

        // A leaked guard (and leaked TAP descriptors: the TAP stays).
        std::mem::forget(HostKernel::start(&cfg).unwrap());
        assert!(link_exists(&tcfg.tap));
        let report = takeover::repair(&tcfg).unwrap();
        assert!(report.state_restored, "{report:?}");
        assert!(!link_exists(&tcfg.tap));
        assert_eq!(normalized_view("sw0").unwrap(), before);
        assert!(!takeover::repair(&tcfg).unwrap().found_leftovers());

        // The next start repairs by itself.
        std::mem::forget(HostKernel::start(&cfg).unwrap());
        let mut host = HostKernel::start(&cfg).unwrap();
        assert_taken_over(host.tap().name());
        host.restore().unwrap();
        assert_eq!(normalized_view("sw0").unwrap(), before);

        // A TAP without a state file is deleted.
        std::mem::forget(HostKernel::start(&cfg).unwrap());
        std::fs::remove_file(tcfg.state_file()).unwrap();
        takeover::ip(&["link", "del", "dev", &tcfg.tap]).unwrap();
        let tap = usnetd::host::tap::Tap::open(&usnetd::host::tap::TapConfig {
            name: tcfg.tap.clone(),
            queues: 1,
            offload: false,
        })
        .unwrap();
        std::mem::forget(tap);
        let report = takeover::repair(&tcfg).unwrap();
        assert!(report.tap_deleted && !report.state_restored, "{report:?}");
        assert!(!link_exists(&tcfg.tap));
    });
    let _ = std::fs::remove_dir_all(state_dir(&prefix));
}

/// Not a test by itself: the child process of `host_repair_after_sigkill`.
#[test]
#[ignore]
fn host_child_takeover_then_wait() {
    let Ok(dir) = std::env::var("USNETD_HOST_CHILD_STATE_DIR") else {
        return;
    };
    let mut cfg = HostConfig::new("sw0");
    cfg.state_dir = PathBuf::from(dir);
    let host = HostKernel::start(&cfg).unwrap();
    println!("READY {}", host.tap().name());
    std::thread::sleep(Duration::from_secs(60));
    panic!("the parent should have killed this process");
}

#[test]
fn host_repair_after_sigkill() {
    if netns::skip_unless_root("host_repair_after_sigkill") {
        return;
    }
    let prefix = netns::unique_prefix("uhk");
    let bed = netns::Testbed::up(&prefix, 1);
    let dir = state_dir(&prefix);
    let cfg = config(&prefix);
    let sw = bed.sw();
    let before = netns::in_netns(&sw, TIMEOUT, || normalized_view("sw0").unwrap());

    let mut child = Command::new("ip")
        .args(["netns", "exec", &sw])
        .arg(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "host_child_takeover_then_wait",
            "--ignored",
            "--nocapture",
        ])
        .env("USNETD_HOST_CHILD_STATE_DIR", &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("READY") {
                let _ = tx.send(line);
            }
        }
    });
    let ready = rx.recv_timeout(TIMEOUT);
    child.kill().unwrap(); // SIGKILL: no Drop runs in the child.
    child.wait().unwrap();
    let ready = ready.expect("child never took over");
    assert_eq!(ready, "READY sw0usnetd");

    let state_file = cfg.takeover_config().state_file();
    assert!(Path::new(&state_file).exists());
    netns::in_netns(&sw, TIMEOUT, move || {
        let tcfg = cfg.takeover_config();
        // The TAP died with its process, and the routes it carried with it.
        assert!(!link_exists(&tcfg.tap));
        assert_eq!(moved_routes("sw0"), Vec::<Value>::new());
        let report = takeover::repair(&tcfg).unwrap();
        assert!(report.state_restored, "{report:?}");
        assert_eq!(report.routes_readded, 5, "{report:?}");
        assert_eq!(normalized_view("sw0").unwrap(), before);
        assert!(!tcfg.state_file().exists());
    });
    let _ = std::fs::remove_dir_all(&dir);
}
