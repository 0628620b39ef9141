//! Counters: every frame a worker handles ends up in exactly one of them, so "where did my
//! packet go" is always answerable.

use std::fmt;

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than the headers it announces.
    Truncated = 0,
    /// Header fields that cannot be right (bad IHL, bad version, bad length).
    Malformed,
    /// An EtherType or IP protocol the switch does not forward.
    Unsupported,
    /// Destination (or source) is a loopback address.
    Loopback,
    /// No rule matches (for the kernel: the firewall).
    NoRule,
    /// A non-first IPv4/IPv6 fragment whose first fragment was not seen (or has expired).
    FragmentWithoutFirst,
    /// The fragment table was full when a first fragment arrived.
    FragmentTableFull,
    /// The destination endpoint's channel had no room.
    ChannelFull,
    /// The NIC transmit queue had no room.
    TxFull,
    /// The rule points back to the endpoint the frame came from.
    Bounce,
    /// An endpoint sent a frame whose source (IP, protocol, port) belongs to another endpoint.
    SpoofedSource,
    /// The rule names an endpoint that no longer exists.
    NoEndpoint,
}

impl DropReason {
    /// Number of reasons (array size for per-reason counters).
    pub const COUNT: usize = 12;

    /// All reasons, in counter order.
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::Truncated,
        DropReason::Malformed,
        DropReason::Unsupported,
        DropReason::Loopback,
        DropReason::NoRule,
        DropReason::FragmentWithoutFirst,
        DropReason::FragmentTableFull,
        DropReason::ChannelFull,
        DropReason::TxFull,
        DropReason::Bounce,
        DropReason::SpoofedSource,
        DropReason::NoEndpoint,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::Malformed => "malformed",
            DropReason::Unsupported => "unsupported",
            DropReason::Loopback => "loopback",
            DropReason::NoRule => "no_rule",
            DropReason::FragmentWithoutFirst => "fragment_without_first",
            DropReason::FragmentTableFull => "fragment_table_full",
            DropReason::ChannelFull => "channel_full",
            DropReason::TxFull => "tx_full",
            DropReason::Bounce => "bounce",
            DropReason::SpoofedSource => "spoofed_source",
            DropReason::NoEndpoint => "no_endpoint",
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
