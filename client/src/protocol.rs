//! The control protocol's messages, byte-compatible with the original usnetd (`libusnetd`).
//!
//! Every request is one datagram holding one JSON text in serde's default externally tagged
//! encoding (see `PROTOCOL.md`):
//!
//! | request | JSON | answer |
//! | --- | --- | --- |
//! | [`ControlMessage::RequestUDS`] | `{"RequestUDS":["eth0",4242]}` | [`ANSWER_FD`] (`$`) + 1 fd, or [`ANSWER_ERR`] |
//! | [`ControlMessage::RequestNetmapPipe`] | `{"RequestNetmapPipe":["eth0",4242]}` | raw `struct nmreq` + 1 fd, or [`ANSWER_ERR`] |
//! | [`ControlMessage::AddMatch`] | `{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":8080,"src_addr":null,"src_port":null,"protocol":6}}` | [`ANSWER_OK`] or [`ANSWER_ERR`] |
//! | [`ControlMessage::RemoveMatch`] | `{"RemoveMatch":{...}}` | none |
//! | [`ControlMessage::QueryUsedPorts`] | `"QueryUsedPorts"` | [`ControlAnswer::QueryUsedPortsAnswer`] |
//! | [`ControlMessage::DeleteClient`] | `"DeleteClient"` | none |
//! | [`ControlMessage::RequestShm`] (new) | `{"RequestShm":["eth0",4242]}` | [`ControlAnswer::ShmChannel`] + fds, or [`ANSWER_ERR`] |
//!
//! # The shared-memory channel answer (extension)
//!
//! `RequestShm(interface, pid)` asks for a shared-memory ring channel instead of a Unix
//! datagram socket. On success the answer is ONE datagram whose bytes are the JSON text
//!
//! ```text
//! {"ShmChannel":{"version":1,"map_size":N,"to_client_rings":R,"to_switch_rings":T,"slots":K,"slot_size":S}}
//! ```
//!
//! (field order exactly as in [`ShmChannelInfo`]) and which carries, by one `SCM_RIGHTS`
//! control message, the file descriptors of the channel in this order:
//!
//! 1. the memfd holding all rings: map `map_size` bytes of it `MAP_SHARED`, read and write;
//! 2. then one eventfd per ring, first the `to_client_rings` rings (switch -> client, one per
//!    worker), then the `to_switch_rings` rings (client -> switch). The eventfds are doorbells;
//!    their exact use and the ring layout inside the memfd (of layout `version`) are defined by
//!    the channel implementation (`usnetd::channel::shm`).
//!
//! A client must check `version` and refuse layouts it does not know. On failure the answer is
//! the 2 bytes `ER` without any fd. An answer that starts with `{` is never 2 bytes long, so the
//! two cannot be confused.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// The default path of the daemon's control socket; existing clients check that every answer
/// comes from exactly this path.
pub const SOCKET_PATH: &str = "/run/usnetd.socket";

/// The largest request datagram the daemon accepts (bytes).
pub const MAX_REQUEST_LEN: usize = 4000;

/// The receive buffer existing clients use for the answer to `QueryUsedPorts` (bytes).
pub const MAX_ANSWER_LEN: usize = 1_000_000;

/// Answer to a successful `RequestUDS`: one byte, sent together with the channel's fd.
pub const ANSWER_FD: &[u8] = b"$";
/// Answer to a successful `AddMatch`.
pub const ANSWER_OK: &[u8] = b"OK";
/// Answer to any failed request that has an answer.
pub const ANSWER_ERR: &[u8] = b"ER";

/// An IP address as the protocol encodes it: `{"Ipv4":"a.b.c.d"}` or `{"Ipv6":"..."}`.
///
/// (serde's own encoding of `std::net::IpAddr` in JSON is a plain string, which is not what
/// the existing clients send.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WireIp {
    /// An IPv4 address, encoded as its dotted-quad string.
    Ipv4(Ipv4Addr),
    /// An IPv6 address, encoded as its RFC 5952 string.
    Ipv6(Ipv6Addr),
}

impl WireIp {
    /// Converts to the standard library's address type.
    pub fn to_std(self) -> std::net::IpAddr {
        match self {
            WireIp::Ipv4(a) => std::net::IpAddr::V4(a),
            WireIp::Ipv6(a) => std::net::IpAddr::V6(a),
        }
    }
}

impl From<std::net::IpAddr> for WireIp {
    fn from(a: std::net::IpAddr) -> WireIp {
        match a {
            std::net::IpAddr::V4(v4) => WireIp::Ipv4(v4),
            std::net::IpAddr::V6(v6) => WireIp::Ipv6(v6),
        }
    }
}

impl From<Ipv4Addr> for WireIp {
    fn from(a: Ipv4Addr) -> WireIp {
        WireIp::Ipv4(a)
    }
}

impl From<Ipv6Addr> for WireIp {
    fn from(a: Ipv6Addr) -> WireIp {
        WireIp::Ipv6(a)
    }
}

impl fmt::Display for WireIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_std())
    }
}

/// A rule as a client registers it (the original's `WantMsg`). `dst_*` is the local side and
/// `src_*` the remote side, as seen in frames arriving from the network. Field order is part
/// of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UsnetMatch {
    /// The local IP address.
    pub dst_addr: WireIp,
    /// The local port (`None` for portless protocols such as ICMP).
    pub dst_port: Option<u16>,
    /// The remote IP address of one connection, `None` for a listening rule.
    pub src_addr: Option<WireIp>,
    /// The remote port of one connection, `None` for a listening rule.
    pub src_port: Option<u16>,
    /// The IP protocol number (1 ICMP, 6 TCP, 17 UDP, 58 ICMPv6, ...).
    pub protocol: u8,
}

/// A request from a client to the daemon. Variant order and names are part of the wire format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Asks for a netmap pipe on `interface` for the process or thread `pid`.
    RequestNetmapPipe(String, i32),
    /// Asks for a Unix datagram socket pair channel on `interface` for `pid`.
    RequestUDS(String, i32),
    /// Removes the client with all its channels and rules. No answer.
    DeleteClient,
    /// Registers a rule for the client's channel: answer `OK` or `ER`.
    AddMatch(UsnetMatch),
    /// Removes one of the client's rules. No answer.
    RemoveMatch(UsnetMatch),
    /// Asks for all local ports in use: answer [`ControlAnswer::QueryUsedPortsAnswer`].
    QueryUsedPorts,
    /// Extension: asks for a shared-memory ring channel on `interface` for `pid`; answer
    /// [`ControlAnswer::ShmChannel`] with fds (see the module docs) or `ER`.
    RequestShm(String, i32),
}

impl ControlMessage {
    /// Whether the daemon answers this request (`RemoveMatch` and `DeleteClient` get none).
    pub fn has_answer(&self) -> bool {
        !matches!(
            self,
            ControlMessage::RemoveMatch(_) | ControlMessage::DeleteClient
        )
    }

    /// Whether a datagram with this top-level variant name gets an answer; used for datagrams
    /// whose variant can be read but whose contents cannot be decoded. Besides the requests
    /// without answer, an answer sent to the daemon (`QueryUsedPortsAnswer`, which the
    /// original protocol enum contained) is never answered.
    pub fn variant_has_answer(name: &str) -> bool {
        !matches!(
            name,
            "RemoveMatch" | "DeleteClient" | "QueryUsedPortsAnswer" | "ShmChannel"
        )
    }

    /// The JSON text of this request.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control messages always serialize")
    }
}

/// The local ports in use: `(protocol, local ip, local port)` of every rule with a port, rules
/// with a remote address under `connected`, the others under `listening`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsedPorts {
    /// Ports of rules without a remote address.
    pub listening: Vec<(u8, WireIp, u16)>,
    /// Ports of rules with a remote address.
    pub connected: Vec<(u8, WireIp, u16)>,
}

/// The parameters of a shared-memory channel (see the module docs for the fds that come with
/// them). Field order is part of the wire format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmChannelInfo {
    /// Layout version of the rings in the memfd.
    pub version: u32,
    /// Bytes to map from the memfd (the first fd).
    pub map_size: u64,
    /// Number of rings from the switch to the client (one per worker).
    pub to_client_rings: u32,
    /// Number of rings from the client to the switch.
    pub to_switch_rings: u32,
    /// Slots per ring.
    pub slots: u32,
    /// Bytes per slot.
    pub slot_size: u32,
}

/// A JSON answer from the daemon (the short answers `$`, `OK`, `ER` are raw bytes instead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlAnswer {
    /// The answer to `QueryUsedPorts`:
    /// `{"QueryUsedPortsAnswer":{"listening":[[6,{"Ipv4":"10.0.0.2"},8080]],"connected":[]}}`.
    QueryUsedPortsAnswer(UsedPorts),
    /// Extension: the answer to a successful `RequestShm`.
    ShmChannel(ShmChannelInfo),
}

impl ControlAnswer {
    /// The JSON text of this answer.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("control answers always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> WireIp {
        WireIp::Ipv4(s.parse().unwrap())
    }

    /// Each example line of PROTOCOL.md with the message it encodes.
    fn examples() -> Vec<(&'static str, ControlMessage)> {
        vec![
            (
                r#"{"RequestUDS":["eth0",4242]}"#,
                ControlMessage::RequestUDS("eth0".into(), 4242),
            ),
            (
                r#"{"RequestNetmapPipe":["eth0",4242]}"#,
                ControlMessage::RequestNetmapPipe("eth0".into(), 4242),
            ),
            (
                r#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":8080,"src_addr":null,"src_port":null,"protocol":6}}"#,
                ControlMessage::AddMatch(UsnetMatch {
                    dst_addr: v4("10.0.0.2"),
                    dst_port: Some(8080),
                    src_addr: None,
                    src_port: None,
                    protocol: 6,
                }),
            ),
            (
                r#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":40001,"src_addr":{"Ipv4":"10.0.0.1"},"src_port":443,"protocol":6}}"#,
                ControlMessage::AddMatch(UsnetMatch {
                    dst_addr: v4("10.0.0.2"),
                    dst_port: Some(40001),
                    src_addr: Some(v4("10.0.0.1")),
                    src_port: Some(443),
                    protocol: 6,
                }),
            ),
            (
                r#"{"RemoveMatch":{"dst_addr":{"Ipv4":"10.0.0.2"},"dst_port":8080,"src_addr":null,"src_port":null,"protocol":6}}"#,
                ControlMessage::RemoveMatch(UsnetMatch {
                    dst_addr: v4("10.0.0.2"),
                    dst_port: Some(8080),
                    src_addr: None,
                    src_port: None,
                    protocol: 6,
                }),
            ),
            (r#""QueryUsedPorts""#, ControlMessage::QueryUsedPorts),
            (r#""DeleteClient""#, ControlMessage::DeleteClient),
            (
                r#"{"RequestShm":["eth0",4242]}"#,
                ControlMessage::RequestShm("eth0".into(), 4242),
            ),
        ]
    }

    #[test]
    fn requests_encode_byte_for_byte_as_protocol_md() {
        for (json, msg) in examples() {
            assert_eq!(msg.to_json().as_bytes(), json.as_bytes(), "{msg:?}");
        }
    }

    #[test]
    fn requests_decode_from_protocol_md() {
        for (json, msg) in examples() {
            let decoded: ControlMessage = serde_json::from_slice(json.as_bytes()).unwrap();
            assert_eq!(decoded, msg);
        }
    }

    #[test]
    fn used_ports_answer_encodes_byte_for_byte() {
        let a = ControlAnswer::QueryUsedPortsAnswer(UsedPorts {
            listening: vec![(6, v4("10.0.0.2"), 8080)],
            connected: vec![(6, v4("10.0.0.2"), 40001)],
        });
        let json = r#"{"QueryUsedPortsAnswer":{"listening":[[6,{"Ipv4":"10.0.0.2"},8080]],"connected":[[6,{"Ipv4":"10.0.0.2"},40001]]}}"#;
        assert_eq!(a.to_json(), json);
        assert_eq!(serde_json::from_str::<ControlAnswer>(json).unwrap(), a);
    }

    #[test]
    fn ipv6_uses_the_tagged_form() {
        let m = UsnetMatch {
            dst_addr: WireIp::Ipv6("2001:db8::2".parse().unwrap()),
            dst_port: Some(80),
            src_addr: Some(WireIp::Ipv6("2001:db8::1".parse().unwrap())),
            src_port: Some(5000),
            protocol: 6,
        };
        let json = ControlMessage::AddMatch(m).to_json();
        assert_eq!(
            json,
            r#"{"AddMatch":{"dst_addr":{"Ipv6":"2001:db8::2"},"dst_port":80,"src_addr":{"Ipv6":"2001:db8::1"},"src_port":5000,"protocol":6}}"#
        );
    }

    #[test]
    fn shm_answer_layout() {
        let a = ControlAnswer::ShmChannel(ShmChannelInfo {
            version: 1,
            map_size: 4096,
            to_client_rings: 2,
            to_switch_rings: 1,
            slots: 256,
            slot_size: 2048,
        });
        assert_eq!(
            a.to_json(),
            r#"{"ShmChannel":{"version":1,"map_size":4096,"to_client_rings":2,"to_switch_rings":1,"slots":256,"slot_size":2048}}"#
        );
    }

    #[test]
    fn bad_requests_do_not_decode() {
        for bad in [
            r#"{"AddMatch":{"dst_addr":{"Ipv4":"10.0.0.300"},"dst_port":1,"src_addr":null,"src_port":null,"protocol":6}}"#,
            r#"{"AddMatch":{"dst_addr":"10.0.0.2","dst_port":1,"src_addr":null,"src_port":null,"protocol":6}}"#,
            r#"{"RequestUDS":["eth0"]}"#,
            r#""Frobnicate""#,
            r#"end"#,
            r#"{"QueryUsedPortsAnswer":{"listening":[],"connected":[]}}"#,
        ] {
            assert!(
                serde_json::from_str::<ControlMessage>(bad).is_err(),
                "{bad}"
            );
        }
        assert!(ControlMessage::variant_has_answer("AddMatch"));
        assert!(!ControlMessage::variant_has_answer("RemoveMatch"));
        assert!(!ControlMessage::DeleteClient.has_answer());
    }
}
