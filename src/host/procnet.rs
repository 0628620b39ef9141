//! The host kernel's sockets, read from `/proc/net/{tcp,tcp6,udp,udp6}`, and its ephemeral port
//! range from `/proc/sys/net/ipv4/ip_local_port_range`.
//!
//! The daemon uses them to age learned kernel rules (a rule whose local port has no kernel
//! socket any more is removed) and to refuse client rules on ports the kernel uses.
//!
//! API: [`parse_sockets`] (pure, one file's text), [`KernelSockets::read`] (all four files under
//! a directory: `/proc/net`, `/proc/<pid>/net`, `/proc/thread-self/net` or a test directory),
//! [`KernelSockets::has_local_port`], [`KernelSockets::tcp_listening`],
//! [`KernelSockets::udp_bound`], [`parse_port_range`] and [`read_port_range`].
//!
//! Addresses are returned as [`Ip`] (IPv4 stored IPv4-mapped), so an IPv4 socket in `tcp` and
//! an IPv4-mapped socket in `tcp6` compare equal, as they do in rule keys.

use std::collections::HashSet;
use std::fmt;
use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::path::Path;

use usnetd_shards::key::{proto, Ip};

/// The TCP state number of a listening socket (`TCP_LISTEN`, printed as `0A`).
pub const TCP_LISTEN: u8 = 0x0A;
/// The state of an unconnected (only bound) UDP socket (`TCP_CLOSE`, printed as `07`).
pub const UDP_UNCONNECTED: u8 = 0x07;

/// One line of a `/proc/net/{tcp,udp}[6]` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSocket {
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// Local address (unspecified when bound to any address).
    pub local_ip: Ip,
    /// Local port.
    pub local_port: u16,
    /// Remote address (unspecified when not connected).
    pub remote_ip: Ip,
    /// Remote port (0 when not connected).
    pub remote_port: u16,
    /// The kernel's socket state number (`st` column), e.g. [`TCP_LISTEN`].
    pub state: u8,
}

/// A line that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line number in the file's text.
    pub line: usize,
    /// What was wrong.
    pub reason: &'static str,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

impl std::error::Error for ParseError {}

/// Parses an address as the kernel prints it: 8 hex digits (IPv4) or 32 (IPv6), each group of
/// 8 digits being a 32-bit word in host byte order; then `:` and the port in 4 hex digits.
fn parse_endpoint(text: &str) -> Option<(Ip, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let digits = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(digits, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => Ip::v4(word(0)?),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Ip::v6(octets)
        }
        _ => return None,
    };
    Some((ip, port))
}

/// Parses the text of one `/proc/net/{tcp,tcp6,udp,udp6}` file (header line first) into its
/// sockets. `proto` is [`proto::TCP`] or [`proto::UDP`] and is stored in each socket.
pub fn parse_sockets(text: &str, proto: u8) -> Result<Vec<KernelSocket>, ParseError> {
    let mut sockets = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let mut fields = line.split_whitespace();
        let Some(slot) = fields.next() else { continue };
        if !slot.ends_with(':') {
            // The header ("sl local_address ...").
            continue;
        }
        let err = |reason| ParseError {
            line: line_no,
            reason,
        };
        let (local_ip, local_port) = fields
            .next()
            .and_then(parse_endpoint)
            .ok_or(err("bad local address"))?;
        let (remote_ip, remote_port) = fields
            .next()
            .and_then(parse_endpoint)
            .ok_or(err("bad remote address"))?;
        let state = fields
            .next()
            .and_then(|s| u8::from_str_radix(s, 16).ok())
            .ok_or(err("bad state"))?;
        sockets.push(KernelSocket {
            proto,
            local_ip,
            local_port,
            remote_ip,
            remote_port,
            state,
        });
    }
    Ok(sockets)
}

/// All TCP and UDP sockets of one network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelSockets {
    /// Every socket of the four tables.
    pub sockets: Vec<KernelSocket>,
}

impl KernelSockets {
    /// Reads `tcp`, `tcp6`, `udp` and `udp6` under `dir` (normally `/proc/net`). A missing file
    /// counts as empty (a kernel without IPv6); unreadable or malformed files are errors.
    pub fn read(dir: &Path) -> io::Result<KernelSockets> {
        Self::read_files(
            dir,
            &[
                ("tcp", proto::TCP),
                ("tcp6", proto::TCP),
                ("udp", proto::UDP),
                ("udp6", proto::UDP),
            ],
        )
    }

    /// Reads only `udp` and `udp6` under `dir` (cheap, unlike the TCP tables, whose reading
    /// walks every connection).
    pub fn read_udp(dir: &Path) -> io::Result<KernelSockets> {
        Self::read_files(dir, &[("udp", proto::UDP), ("udp6", proto::UDP)])
    }

    fn read_files(dir: &Path, files: &[(&str, u8)]) -> io::Result<KernelSockets> {
        let mut sockets = Vec::new();
        for &(file, protocol) in files {
            let path = dir.join(file);
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("reading {}: {e}", path.display()),
                    ))
                }
            };
            let parsed = parse_sockets(&text, protocol).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?;
            sockets.extend(parsed);
        }
        Ok(KernelSockets { sockets })
    }

    /// Whether some socket of `proto` uses local `port` on `ip` (or on the any address).
    pub fn has_local_port(&self, protocol: u8, ip: Ip, port: u16) -> bool {
        self.sockets.iter().any(|s| {
            s.proto == protocol
                && s.local_port == port
                && (s.local_ip == ip || s.local_ip.is_unspecified() || is_any_v4(s.local_ip))
        })
    }

    /// The local (ip, port) of every socket of `proto`, whatever its state.
    pub fn local_ports(&self, protocol: u8) -> HashSet<(Ip, u16)> {
        self.sockets
            .iter()
            .filter(|s| s.proto == protocol)
            .map(|s| (s.local_ip, s.local_port))
            .collect()
    }

    /// The local (ip, port) of listening TCP sockets (state `0A`).
    pub fn tcp_listening(&self) -> HashSet<(Ip, u16)> {
        self.sockets
            .iter()
            .filter(|s| s.proto == proto::TCP && s.state == TCP_LISTEN)
            .map(|s| (s.local_ip, s.local_port))
            .collect()
    }

    /// The local (ip, port) of UDP sockets that are bound but not connected (state `07`): the
    /// ones that receive from anybody.
    pub fn udp_bound(&self) -> HashSet<(Ip, u16)> {
        self.sockets
            .iter()
            .filter(|s| s.proto == proto::UDP && s.state == UDP_UNCONNECTED && s.local_port != 0)
            .map(|s| (s.local_ip, s.local_port))
            .collect()
    }
}

/// `0.0.0.0` as an IPv4-mapped [`Ip`] (an IPv4 socket bound to any address).
fn is_any_v4(ip: Ip) -> bool {
    ip == Ip::v4([0; 4])
}

/// Parses the text of `ip_local_port_range` ("32768\t60999\n").
pub fn parse_port_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    let low = numbers.next()?.ok()?;
    let high = numbers.next()?.ok()?;
    if numbers.next().is_some() || low > high {
        return None;
    }
    Some(low..=high)
}

/// Reads the kernel's ephemeral port range from `path` (normally
/// `/proc/sys/net/ipv4/ip_local_port_range`).
pub fn read_port_range(path: &Path) -> io::Result<RangeInclusive<u16>> {
    let text = fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", path.display())))?;
    parse_port_range(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a port range: {text:?}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    // Taken from a little-endian machine (x86_64); the kernel prints words in host order.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1095 1 00000000ff7f6962 100 0 0 10 0
   1: 0200000A:A2C4 0100000A:01BB 01 00000000:00000000 02:000A7D4B 00000000  1000        0 5511 2 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000200000A:0050 0000000000000000FFFF00000100000A:D431 01 00000000:00000000 00:00000000 00000000     0        0 2002 1 0000000000000000 20 4 30 10 -1
   2: 000077FD000000000000000002000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2003 1 0000000000000000 100 0 0 10 0
";
    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  211: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3001 2 0000000000000000 0
  300: 0200000A:E1F3 0100000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 3002 2 0000000000000000 0
";

    fn v4(a: u8, b: u8, c: u8, d: u8) -> Ip {
        Ip::from(Ipv4Addr::new(a, b, c, d))
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_tcp_v4() {
        let s = parse_sockets(TCP, proto::TCP).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].local_ip, v4(0, 0, 0, 0));
        assert_eq!(s[0].local_port, 22);
        assert_eq!(s[0].state, TCP_LISTEN);
        assert_eq!(s[1].local_ip, v4(10, 0, 0, 2));
        assert_eq!(s[1].local_port, 0xA2C4);
        assert_eq!(s[1].remote_ip, v4(10, 0, 0, 1));
        assert_eq!(s[1].remote_port, 443);
        assert_eq!(s[1].state, 1);
        assert_eq!(s[1].proto, proto::TCP);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_tcp_v6_and_mapped() {
        let s = parse_sockets(TCP6, proto::TCP).unwrap();
        assert_eq!(s.len(), 3);
        assert!(s[0].local_ip.is_unspecified());
        assert_eq!(s[0].local_port, 8080);
        // ::ffff:10.0.0.2 is the same key as the IPv4 socket's address.
        assert_eq!(s[1].local_ip, v4(10, 0, 0, 2));
        assert_eq!(s[1].remote_ip, v4(10, 0, 0, 1));
        assert_eq!(s[1].local_port, 80);
        assert_eq!(
            s[2].local_ip,
            Ip::from("fd77::2".parse::<Ipv6Addr>().unwrap())
        );
        assert_eq!(s[2].local_port, 8081);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn sets_listening_bound_and_any() {
        let mut sockets = parse_sockets(TCP, proto::TCP).unwrap();
        sockets.extend(parse_sockets(TCP6, proto::TCP).unwrap());
        sockets.extend(parse_sockets(UDP, proto::UDP).unwrap());
        let k = KernelSockets { sockets };
        let listening = k.tcp_listening();
        assert!(listening.contains(&(v4(0, 0, 0, 0), 22)));
        assert!(listening.contains(&(Ip::UNSPECIFIED, 8080)));
        assert!(!listening.contains(&(v4(10, 0, 0, 2), 0xA2C4)));
        let bound = k.udp_bound();
        assert_eq!(bound.len(), 1);
        assert!(bound.contains(&(v4(0, 0, 0, 0), 68)));
        // A socket bound to 0.0.0.0 covers every local address; a specific one only its own.
        assert!(k.has_local_port(proto::TCP, v4(10, 0, 0, 2), 22));
        assert!(k.has_local_port(proto::TCP, v4(10, 0, 0, 2), 0xA2C4));
        assert!(!k.has_local_port(proto::TCP, v4(10, 0, 0, 3), 0xA2C4));
        assert!(k.has_local_port(proto::UDP, v4(10, 0, 0, 2), 0xE1F3));
        assert!(!k.has_local_port(proto::UDP, v4(10, 0, 0, 2), 22));
        assert!(k
            .local_ports(proto::UDP)
            .contains(&(v4(10, 0, 0, 2), 0xE1F3)));
    }

    #[test]
    fn rejects_malformed_lines() {
        let bad = "  sl local\n   0: 0100007F:XYZ0 00000000:0000 0A\n";
        assert_eq!(
            parse_sockets(bad, proto::TCP),
            Err(ParseError {
                line: 2,
                reason: "bad local address"
            })
        );
        let short = "  sl local\n   0: 0100007F:0016\n";
        assert_eq!(parse_sockets(short, proto::TCP).unwrap_err().line, 2);
        let bad_len = "   0: 0100007F00:0016 00000000:0000 0A\n";
        assert!(parse_sockets(bad_len, proto::TCP).is_err());
        assert_eq!(parse_sockets("", proto::UDP), Ok(vec![]));
    }

    #[test]
    fn port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_port_range("1024 1024"), Some(1024..=1024));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
        assert_eq!(parse_port_range("a b"), None);
    }

    #[test]
    fn reads_a_directory_and_this_kernel() {
        let dir = std::env::temp_dir().join(format!("usnetd-procnet-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("tcp"), TCP).unwrap();
        fs::write(dir.join("udp"), UDP).unwrap();
        // tcp6 and udp6 missing: treated as empty.
        let k = KernelSockets::read(&dir).unwrap();
        assert_eq!(k.sockets.len(), 4);
        fs::write(dir.join("udp6"), "  sl\n  0: zz\n").unwrap();
        assert!(KernelSockets::read(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
        // The real files parse (whatever sockets exist).
        assert!(KernelSockets::read(Path::new("/proc/net")).is_ok());
        let range = read_port_range(Path::new("/proc/sys/net/ipv4/ip_local_port_range")).unwrap();
        assert!(range.start() <= range.end());
    }
}
