//! Moving the host kernel's view of a NIC onto the switch's TAP, and back.
//!
//! API: [`Takeover::prepare`] repairs leftovers of an earlier run, records the NIC's state
//! (`ip -json` link, addresses, routes of every table but `local`, ARP sysctls) and writes it
//! to the state file `<state_dir>/<NIC>.json` *before* anything changes.
//! [`Takeover::apply`] (once the TAP exists) gives the TAP the NIC's MAC and MTU, copies the
//! NIC's global IPv4/IPv6 addresses (`noprefixroute`, IPv6 `nodad`), brings it up, sets the ARP
//! sysctls of the NIC, and moves the NIC's routes to the TAP (deleted on the NIC, added on the
//! TAP with the same type, destination, gateway, table, protocol, scope, source, metric,
//! preference, onlink flag and metrics). [`Takeover::restore`] (also run by `Drop`) deletes the
//! TAP, puts the routes back on the NIC, restores the sysctls and removes the state file; it
//! is idempotent. [`repair`] does the same from the state file after a crash (SIGKILL).
//!
//! Choices:
//! - The NIC keeps its addresses (clients read them there) but has no routes, so the kernel
//!   sends everything through the TAP. The `local` table (local/broadcast routes of the
//!   addresses) is left alone: the kernel keeps accepting its addresses on every device.
//! - ARP: the switch copies ARP frames to the kernel through the TAP, where the kernel answers
//!   for its addresses (the TAP holds them). On the NIC itself, `arp_ignore = 8` (never answer)
//!   keeps a backend that still lets the kernel see NIC frames (AF_PACKET) from producing a
//!   second answer that bypasses the switch, and `arp_announce = 2` keeps any ARP the kernel
//!   might still send there correct. Both are restored. IPv6 neighbour discovery has no such
//!   knob: with such a backend the kernel also answers neighbour solicitations on the NIC.
//! - `rp_filter = 2` (loose) on the NIC: the XDP backend's kernel fast path hands the frames of
//!   the kernel's own rules to the kernel on the NIC (`backend::kernel_pass`), whose routes are
//!   on the TAP; a strict reverse-path check (`1`, on the NIC or `all`: the kernel takes the
//!   larger) would drop them. Restored like the ARP sysctls.
//! - Routes with a lifetime (IPv6 router advertisements) are moved and restored without it.
//!   Multipath routes and routes using nexthop objects are not supported: `apply` fails
//!   (and restores) rather than leave kernel traffic bypassing the switch.
//! - If the NIC's link goes down and up while the switch runs, the kernel puts its prefix
//!   routes back on the NIC; [`Takeover::reassert`] moves such routes again.
//!
//! Every `ip` failure is an error carrying the command line and its stderr.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Default directory of the state files.
pub const DEFAULT_STATE_DIR: &str = "/run/usnetd";

/// The sysctls set on the NIC while the TAP is active, with their values.
pub const NIC_SYSCTLS: [(&str, &str); 3] = [
    ("net/ipv4/conf/{}/arp_ignore", "8"),
    ("net/ipv4/conf/{}/arp_announce", "2"),
    ("net/ipv4/conf/{}/rp_filter", "2"),
];

/// What to take over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TakeoverConfig {
    /// The claimed NIC.
    pub nic: String,
    /// The TAP that takes the NIC's place for the kernel (see [`super::tap::tap_name_for`]).
    pub tap: String,
    /// Where the state file lives (default [`DEFAULT_STATE_DIR`]).
    pub state_dir: PathBuf,
    /// Whether to set the ARP sysctls on the NIC ([`NIC_SYSCTLS`]).
    pub arp_sysctls: bool,
}

impl TakeoverConfig {
    /// The defaults for `nic`: TAP `<nic>usnetd`, state in `/run/usnetd`, ARP sysctls set.
    pub fn new(nic: &str) -> TakeoverConfig {
        TakeoverConfig {
            nic: nic.to_string(),
            tap: super::tap::tap_name_for(nic),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            arp_sysctls: true,
        }
    }

    /// The state file: `<state_dir>/<nic>.json`.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join(format!("{}.json", self.nic))
    }
}

/// A route as `ip -json route` shows it, with its family (`inet` or `inet6`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRoute {
    /// `inet` or `inet6`.
    pub family: String,
    /// The route object from `ip -json route show dev NIC table all`.
    pub route: Value,
}

/// A sysctl value to put back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedSysctl {
    /// Path under `/proc/sys`.
    pub path: String,
    /// The value before the takeover (trimmed).
    pub value: String,
}

/// What the NIC looked like before the takeover: the content of the state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NicState {
    /// The NIC's name.
    pub nic: String,
    /// The TAP's name.
    pub tap: String,
    /// The process that wrote the state file.
    pub pid: u32,
    /// The link object of `ip -json link show dev NIC`.
    pub link: Value,
    /// The `addr_info` entries of `ip -json addr show dev NIC`.
    pub addrs: Vec<Value>,
    /// The routes of all tables on the NIC, IPv4 then IPv6.
    pub routes: Vec<RecordedRoute>,
    /// Sysctls changed by the takeover (empty when it does not change any).
    pub sysctls: Vec<RecordedSysctl>,
}

impl NicState {
    /// The NIC's MAC address.
    pub fn mac(&self) -> Option<&str> {
        self.link.get("address").and_then(Value::as_str)
    }

    /// The NIC's MTU.
    pub fn mtu(&self) -> Option<u64> {
        self.link.get("mtu").and_then(Value::as_u64)
    }

    /// The routes that move to the TAP: all but those of table `local`.
    pub fn movable_routes(&self) -> impl Iterator<Item = &RecordedRoute> {
        self.routes
            .iter()
            .filter(|r| r.route.get("table").and_then(Value::as_str) != Some("local"))
    }

    /// The global-scope addresses that the TAP gets.
    pub fn global_addrs(&self) -> impl Iterator<Item = &Value> {
        self.addrs
            .iter()
            .filter(|a| a.get("scope").and_then(Value::as_str) == Some("global"))
    }
}

/// Runs `ip ARGS`; returns stdout, or an error with the command line and its stderr.
pub fn ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `ip {}`: {e}", args.join(" "))))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `ip -json ARGS` and parses the output (empty output is an empty array).
pub fn ip_json(args: &[&str]) -> io::Result<Value> {
    let mut all = vec!["-json"];
    all.extend_from_slice(args);
    let text = ip(&all)?;
    if text.trim().is_empty() {
        return Ok(Value::Array(vec![]));
    }
    serde_json::from_str(&text).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("`ip {}` gave unparsable JSON: {e}", all.join(" ")),
        )
    })
}

/// Whether interface `name` exists (in the calling thread's network namespace).
pub fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).is_ok()
}

fn is_exists_error(e: &io::Error) -> bool {
    e.to_string().contains("File exists")
}

fn is_missing_error(e: &io::Error) -> bool {
    let text = e.to_string();
    text.contains("No such process") || text.contains("No such file or directory")
}

fn is_down_error(e: &io::Error) -> bool {
    e.to_string().contains("Network is down")
}

/// `ip route` arguments (after `add`/`del`, before `dev`) that recreate `route`.
pub fn route_args(route: &RecordedRoute) -> io::Result<Vec<String>> {
    let r = &route.route;
    let unsupported = |what: &str| {
        io::Error::new(
            io::ErrorKind::Unsupported,
            format!("cannot move {what} route {r}"),
        )
    };
    if r.get("nexthops").is_some() || r.get("multipath").is_some() {
        return Err(unsupported("multipath"));
    }
    if r.get("nhid").is_some() {
        return Err(unsupported("nexthop object"));
    }
    let text = |key: &str| -> Option<String> {
        match r.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    };
    let mut args = Vec::new();
    if let Some(kind) = text("type") {
        if kind != "unicast" {
            args.push(kind);
        }
    }
    args.push(text("dst").ok_or_else(|| unsupported("destination-less"))?);
    if let Some(tos) = text("tos") {
        args.extend(["tos".into(), tos]);
    }
    if let Some(gateway) = text("gateway") {
        args.extend(["via".into(), gateway]);
    } else if let Some(via) = r.get("via") {
        let family = via.get("family").and_then(Value::as_str);
        let host = via.get("host").and_then(Value::as_str);
        match (family, host) {
            (Some(family), Some(host)) => {
                args.extend(["via".into(), family.into(), host.into()]);
            }
            _ => return Err(unsupported("odd gateway")),
        }
    }
    if let Some(table) = text("table") {
        args.extend(["table".into(), table]);
    }
    if let Some(protocol) = text("protocol") {
        args.extend(["proto".into(), protocol]);
    }
    if route.family == "inet" {
        // Absent means universe; `ip route add` would default a gatewayless route to link.
        args.extend([
            "scope".into(),
            text("scope").unwrap_or_else(|| "global".into()),
        ]);
    }
    if let Some(src) = text("prefsrc") {
        args.extend(["src".into(), src]);
    }
    if let Some(metric) = text("metric") {
        args.extend(["metric".into(), metric]);
    }
    if let Some(pref) = text("pref") {
        args.extend(["pref".into(), pref]);
    }
    if let Some(metrics) = r.get("metrics").and_then(Value::as_array) {
        for entry in metrics {
            for (key, value) in entry.as_object().into_iter().flatten() {
                match value {
                    Value::Number(n) => args.extend([key.clone(), n.to_string()]),
                    Value::String(s) => args.extend([key.clone(), s.clone()]),
                    _ => return Err(unsupported("locked-metric")),
                }
            }
        }
    }
    let flags = r.get("flags").and_then(Value::as_array);
    if flags.is_some_and(|f| f.iter().any(|x| x.as_str() == Some("onlink"))) {
        args.push("onlink".into());
    }
    Ok(args)
}

fn has_gateway(route: &RecordedRoute) -> bool {
    route.route.get("gateway").is_some() || route.route.get("via").is_some()
}

fn family_flag(route: &RecordedRoute) -> &'static str {
    if route.family == "inet6" {
        "-6"
    } else {
        "-4"
    }
}

fn route_cmd(verb: &str, route: &RecordedRoute, dev: &str) -> io::Result<()> {
    let mut args: Vec<String> = vec![family_flag(route).into(), "route".into(), verb.into()];
    args.extend(route_args(route)?);
    args.extend(["dev".into(), dev.into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    ip(&refs).map(|_| ())
}

fn sysctl_path(template: &str, nic: &str) -> PathBuf {
    Path::new("/proc/sys").join(template.replace("{}", nic))
}

/// Records the current state of `config.nic`.
pub fn record(config: &TakeoverConfig) -> io::Result<NicState> {
    let nic = config.nic.as_str();
    let link = ip_json(&["link", "show", "dev", nic])?
        .get(0)
        .cloned()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link {nic}")))?;
    let addrs = ip_json(&["addr", "show", "dev", nic])?
        .get(0)
        .and_then(|l| l.get("addr_info"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut routes = Vec::new();
    for (flag, family) in [("-4", "inet"), ("-6", "inet6")] {
        let list = ip_json(&[flag, "route", "show", "dev", nic, "table", "all"])?;
        for route in list.as_array().into_iter().flatten() {
            routes.push(RecordedRoute {
                family: family.into(),
                route: route.clone(),
            });
        }
    }
    let mut sysctls = Vec::new();
    if config.arp_sysctls {
        for (template, _) in NIC_SYSCTLS {
            let path = sysctl_path(template, nic);
            let value = fs::read_to_string(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("reading {}: {e}", path.display()))
            })?;
            sysctls.push(RecordedSysctl {
                path: path.display().to_string(),
                value: value.trim().to_string(),
            });
        }
    }
    Ok(NicState {
        nic: nic.into(),
        tap: config.tap.clone(),
        pid: std::process::id(),
        link,
        addrs,
        routes,
        sysctls,
    })
}

fn write_state_file(path: &Path, state: &NicState) -> io::Result<()> {
    let ctx = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what}: {e}"));
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| ctx(e, &format!("creating {}", dir.display())))?;
    }
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state).map_err(io::Error::other)?;
    fs::write(&tmp, text).map_err(|e| ctx(e, &format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(|e| ctx(e, &format!("renaming to {}", path.display())))
}

fn read_state_file(path: &Path) -> io::Result<Option<NicState>> {
    match fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("state file {}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("reading {}: {e}", path.display()),
        )),
    }
}

/// Puts `state` back: deletes the TAP, re-adds the moved routes to the NIC (prefix routes
/// first), writes the sysctls back and removes the state file. Idempotent: routes that exist
/// already are fine. Returns the number of routes it re-added.
fn restore_state(state: &NicState, state_file: &Path) -> io::Result<usize> {
    let mut first_error: Option<io::Error> = None;
    let mut keep = |e: io::Error| {
        log::error!("restoring {}: {e}", state.nic);
        first_error.get_or_insert(e);
    };
    if link_exists(&state.tap) {
        if let Err(e) = ip(&["link", "del", "dev", &state.tap]) {
            keep(e);
        }
    }
    let mut added = 0;
    let (direct, via): (Vec<_>, Vec<_>) = state.movable_routes().partition(|r| !has_gateway(r));
    for route in direct.into_iter().chain(via) {
        match route_cmd("add", route, &state.nic) {
            Ok(()) => added += 1,
            Err(e) if is_exists_error(&e) => {}
            Err(e) if is_down_error(&e) => {
                log::warn!("{} is down, route not restored: {e}", state.nic);
            }
            Err(e) => keep(e),
        }
    }
    for sysctl in &state.sysctls {
        if let Err(e) = fs::write(&sysctl.path, &sysctl.value) {
            keep(io::Error::new(
                e.kind(),
                format!("writing {} = {}: {e}", sysctl.path, sysctl.value),
            ));
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => match fs::remove_file(state_file) {
            Ok(()) => Ok(added),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(added),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("removing {}: {e}", state_file.display()),
            )),
        },
    }
}

/// What [`repair`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// A state file was found and its state restored.
    pub state_restored: bool,
    /// Routes re-added to the NIC.
    pub routes_readded: usize,
    /// A leftover TAP was deleted (without a state file).
    pub tap_deleted: bool,
}

impl RepairReport {
    /// Whether there was anything to repair.
    pub fn found_leftovers(&self) -> bool {
        self.state_restored || self.tap_deleted
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Repairs what an earlier run that did not restore (crash, SIGKILL) left behind: with a state
/// file, restores it (TAP deleted, routes back, sysctls back, file removed); without one,
/// deletes a leftover TAP. Refuses when the state file belongs to another live process (a
/// running switch). Does nothing when there are no leftovers.
pub fn repair(config: &TakeoverConfig) -> io::Result<RepairReport> {
    let path = config.state_file();
    let mut report = RepairReport::default();
    if let Some(state) = read_state_file(&path)? {
        if state.pid != std::process::id() && process_alive(state.pid) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} belongs to running process {} (another usnetd on {}?)",
                    path.display(),
                    state.pid,
                    state.nic
                ),
            ));
        }
        log::warn!(
            "found {} from process {}: restoring {}",
            path.display(),
            state.pid,
            state.nic
        );
        report.routes_readded = restore_state(&state, &path)?;
        report.state_restored = true;
    } else if link_exists(&config.tap) {
        log::warn!("deleting leftover TAP {}", config.tap);
        ip(&["link", "del", "dev", &config.tap])?;
        report.tap_deleted = true;
    }
    Ok(report)
}

/// An active (or prepared) takeover of one NIC; restores the NIC when dropped.
#[derive(Debug)]
pub struct Takeover {
    config: TakeoverConfig,
    state: NicState,
    restored: bool,
}

impl Takeover {
    /// Repairs leftovers ([`repair`]), records the NIC's state and writes the state file.
    /// Changes nothing else: open the TAP next, then call [`Takeover::apply`].
    pub fn prepare(config: &TakeoverConfig) -> io::Result<Takeover> {
        let report = repair(config)?;
        if report.found_leftovers() {
            log::warn!(
                "repaired leftovers of an earlier run on {}: {report:?}",
                config.nic
            );
        }
        let state = record(config)?;
        write_state_file(&config.state_file(), &state)?;
        Ok(Takeover {
            config: config.clone(),
            state,
            restored: false,
        })
    }

    /// The state recorded before the takeover.
    pub fn state(&self) -> &NicState {
        &self.state
    }

    /// The configuration.
    pub fn config(&self) -> &TakeoverConfig {
        &self.config
    }

    /// Moves the kernel's view of the NIC onto the TAP (which must exist). On error, the
    /// caller drops the takeover, which restores.
    pub fn apply(&mut self) -> io::Result<()> {
        let nic = self.config.nic.as_str();
        let tap = self.config.tap.as_str();
        // Check every route first, so that an unsupported one fails before anything changes.
        for route in self.state.movable_routes() {
            route_args(route)?;
        }
        let mac = self.state.mac().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{nic} has no MAC"))
        })?;
        let mtu = self.state.mtu().unwrap_or(1500).to_string();
        ip(&["link", "set", "dev", tap, "address", mac, "mtu", &mtu])?;
        ip(&["link", "set", "dev", tap, "up"])?;
        for addr in self.state.global_addrs() {
            let family = addr.get("family").and_then(Value::as_str).unwrap_or("");
            let (Some(local), Some(prefixlen)) = (
                addr.get("local").and_then(Value::as_str),
                addr.get("prefixlen").and_then(Value::as_u64),
            ) else {
                continue;
            };
            let cidr = format!("{local}/{prefixlen}");
            let mut args = vec![
                if family == "inet6" { "-6" } else { "-4" },
                "addr",
                "add",
                &cidr,
            ];
            let peer;
            if let Some(address) = addr.get("address").and_then(Value::as_str) {
                peer = format!("{address}/{prefixlen}");
                args.extend(["peer", &peer]);
            }
            if let Some(broadcast) = addr.get("broadcast").and_then(Value::as_str) {
                args.extend(["broadcast", broadcast]);
            }
            args.extend(["dev", tap, "noprefixroute"]);
            if family == "inet6" {
                args.push("nodad");
            }
            match ip(&args) {
                Err(e) if !is_exists_error(&e) => return Err(e),
                _ => {}
            }
        }
        if self.config.arp_sysctls {
            for (template, value) in NIC_SYSCTLS {
                let path = sysctl_path(template, nic);
                fs::write(&path, value).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("writing {} = {value}: {e}", path.display()),
                    )
                })?;
            }
        }
        let (direct, via): (Vec<_>, Vec<_>) =
            self.state.movable_routes().partition(|r| !has_gateway(r));
        for route in via.iter().chain(&direct) {
            match route_cmd("del", route, nic) {
                Err(e) if !is_missing_error(&e) => return Err(e),
                _ => {}
            }
        }
        for route in direct.iter().chain(&via) {
            match route_cmd("add", route, tap) {
                Err(e) if !is_exists_error(&e) => return Err(e),
                _ => {}
            }
        }
        log::info!(
            "kernel side of {nic} moved to {tap}: {} addresses, {} routes",
            self.state.global_addrs().count(),
            direct.len() + via.len()
        );
        Ok(())
    }

    /// Moves routes that reappeared on the NIC (the kernel recreates prefix routes when the
    /// link comes back up) to the TAP again. Returns how many it moved.
    pub fn reassert(&self) -> io::Result<usize> {
        let mut moved = 0;
        for (flag, family) in [("-4", "inet"), ("-6", "inet6")] {
            let list = ip_json(&[
                flag,
                "route",
                "show",
                "dev",
                &self.config.nic,
                "table",
                "all",
            ])?;
            for route in list.as_array().into_iter().flatten() {
                let route = RecordedRoute {
                    family: family.into(),
                    route: route.clone(),
                };
                if route.route.get("table").and_then(Value::as_str) == Some("local") {
                    continue;
                }
                route_cmd("del", &route, &self.config.nic)?;
                match route_cmd("add", &route, &self.config.tap) {
                    Err(e) if !is_exists_error(&e) => return Err(e),
                    _ => moved += 1,
                }
            }
        }
        Ok(moved)
    }

    /// Puts the NIC back as it was (see the module docs). Idempotent; also run on drop.
    pub fn restore(&mut self) -> io::Result<()> {
        restore_state(&self.state, &self.config.state_file())?;
        self.restored = true;
        Ok(())
    }
}

impl Drop for Takeover {
    fn drop(&mut self) {
        if !self.restored {
            if let Err(e) = self.restore() {
                log::error!("restoring {} failed: {e}", self.config.nic);
            }
        }
    }
}

/// The NIC's `ip -json` link, addresses and routes (all tables), with volatile fields
/// (lifetimes, DAD state, counters, ifindex-dependent fields) removed, for comparing states.
pub fn normalized_view(dev: &str) -> io::Result<Value> {
    fn strip(value: &mut Value, keys: &[&str]) {
        match value {
            Value::Object(map) => {
                for key in keys {
                    map.remove(*key);
                }
                for v in map.values_mut() {
                    strip(v, keys);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| strip(v, keys)),
            _ => {}
        }
    }
    let mut view = serde_json::json!({
        "link": ip_json(&["link", "show", "dev", dev])?,
        "addr": ip_json(&["addr", "show", "dev", dev])?,
        "route4": ip_json(&["-4", "route", "show", "dev", dev, "table", "all"])?,
        "route6": ip_json(&["-6", "route", "show", "dev", dev, "table", "all"])?,
    });
    strip(
        &mut view,
        &[
            "valid_life_time",
            "preferred_life_time",
            "tentative",
            "stats64",
            "stats",
            "expires",
        ],
    );
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(family: &str, v: Value) -> RecordedRoute {
        RecordedRoute {
            family: family.into(),
            route: v,
        }
    }

    #[test]
    fn route_args_cover_the_attributes() {
        let r = route(
            "inet",
            json!({"dst":"default","gateway":"10.77.0.1","flags":[]}),
        );
        assert_eq!(
            route_args(&r).unwrap(),
            ["default", "via", "10.77.0.1", "scope", "global"]
        );
        let r = route(
            "inet",
            json!({"dst":"10.77.0.0/24","protocol":"kernel","scope":"link",
                   "prefsrc":"10.77.0.2","metric":100,"flags":["onlink"],
                   "table":"200","metrics":[{"mtu":1400}]}),
        );
        assert_eq!(
            route_args(&r).unwrap(),
            [
                "10.77.0.0/24",
                "table",
                "200",
                "proto",
                "kernel",
                "scope",
                "link",
                "src",
                "10.77.0.2",
                "metric",
                "100",
                "mtu",
                "1400",
                "onlink"
            ]
        );
        let r = route(
            "inet6",
            json!({"dst":"default","gateway":"fd77::1","metric":1024,"flags":[],
                   "pref":"medium"}),
        );
        assert_eq!(
            route_args(&r).unwrap(),
            ["default", "via", "fd77::1", "metric", "1024", "pref", "medium"]
        );
        let r = route("inet", json!({"type":"blackhole","dst":"10.9.0.0/16"}));
        assert_eq!(route_args(&r).unwrap()[..2], ["blackhole", "10.9.0.0/16"]);
    }

    #[test]
    fn route_args_refuse_what_cannot_move() {
        let multipath = route("inet", json!({"dst":"default","nexthops":[]}));
        assert!(route_args(&multipath).is_err());
        let nhid = route("inet", json!({"dst":"default","nhid":5}));
        assert!(route_args(&nhid).is_err());
        let nodst = route("inet", json!({"gateway":"10.0.0.1"}));
        assert!(route_args(&nodst).is_err());
    }

    #[test]
    fn movable_routes_skip_local_table_and_addresses_need_global_scope() {
        let state = NicState {
            nic: "sw0".into(),
            tap: "sw0usnetd".into(),
            pid: 1,
            link: json!({"address":"02:00:00:00:00:01","mtu":9000}),
            addrs: vec![
                json!({"family":"inet","local":"10.0.0.2","prefixlen":24,"scope":"global"}),
                json!({"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}),
            ],
            routes: vec![
                route("inet", json!({"dst":"default","gateway":"10.0.0.1"})),
                route(
                    "inet",
                    json!({"type":"local","dst":"10.0.0.2","table":"local"}),
                ),
            ],
            sysctls: vec![],
        };
        assert_eq!(state.movable_routes().count(), 1);
        assert_eq!(state.global_addrs().count(), 1);
        assert_eq!(state.mac(), Some("02:00:00:00:00:01"));
        assert_eq!(state.mtu(), Some(9000));
        // The state file round-trips.
        let dir = std::env::temp_dir().join(format!("usnetd-takeover-{}", std::process::id()));
        let path = dir.join("sw0.json");
        write_state_file(&path, &state).unwrap();
        assert_eq!(read_state_file(&path).unwrap(), Some(state));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(read_state_file(&path).unwrap(), None);
    }

    #[test]
    fn config_defaults() {
        let c = TakeoverConfig::new("enp1s0f0np0");
        assert_eq!(c.tap, "enp1s0f0nusnetd");
        assert_eq!(c.state_file(), Path::new("/run/usnetd/enp1s0f0np0.json"));
    }
}
