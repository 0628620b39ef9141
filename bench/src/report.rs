//! Per-second rate lines and end-of-run summaries shared by the generator and the sinks.

use std::time::{Duration, Instant};

use serde::Serialize;

/// A run's totals (printed as one line, or as JSON with `--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    /// `gen` or `sink`.
    pub role: String,
    /// How frames were sent or received (`packet`, `uds`, `shm`, `udp`).
    pub mode: String,
    /// Frames sent, or frames received that carry the generator's signature.
    pub frames: u64,
    /// Bytes of those frames (Ethernet header to end of payload; datagram payload for `udp`).
    pub bytes: u64,
    /// Frames received that are not the generator's.
    pub other_frames: u64,
    /// Times the generator found the NIC queue full (and retried).
    pub full: u64,
    /// Generator: frames the interface dropped after accepting them (its `tx_dropped`
    /// increase over the run; absent where it cannot be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// Seconds from the first to the last frame (generator: the whole sending time).
    pub seconds: f64,
    /// Frames per second over `seconds`.
    pub pps: f64,
    /// Bits per second over `seconds` (frame bytes times 8).
    pub bps: f64,
    /// One-way delay percentiles in microseconds (sinks only; same-machine clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owd_us: Option<Percentiles>,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl Percentiles {
    /// Reads the percentiles of a histogram of nanoseconds.
    pub fn from_ns(h: &hdrhistogram::Histogram<u64>) -> Percentiles {
        let us = |v: u64| v as f64 / 1000.0;
        Percentiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

impl Summary {
    /// Fills `pps` and `bps` from the totals and `seconds`.
    pub fn finish(&mut self) {
        if self.seconds > 0.0 {
            self.pps = self.frames as f64 / self.seconds;
            self.bps = self.bytes as f64 * 8.0 / self.seconds;
        }
    }

    /// Prints the summary: JSON on one line, or a human-readable line.
    pub fn print(&self, json: bool) {
        if json {
            println!(
                "{}",
                serde_json::to_string(self).expect("summary serializes")
            );
        } else {
            let mut line = format!(
                "{} {} total: {} frames {} bytes in {:.3} s: {} pps {} (other {}, full {})",
                self.role,
                self.mode,
                self.frames,
                self.bytes,
                self.seconds,
                human(self.pps, ""),
                human(self.bps, "bit/s"),
                self.other_frames,
                self.full
            );
            if let Some(d) = self.dropped {
                line.push_str(&format!(" dropped by the NIC {d}"));
            }
            if let Some(p) = self.owd_us {
                line.push_str(&format!(
                    " owd_us p50 {:.1} p99 {:.1} max {:.1}",
                    p.p50, p.p99, p.max
                ));
            }
            println!("{line}");
        }
    }
}

/// `1.23 M` style numbers.
pub fn human(v: f64, unit: &str) -> String {
    let (div, prefix) = if v >= 1e9 {
        (1e9, "G")
    } else if v >= 1e6 {
        (1e6, "M")
    } else if v >= 1e3 {
        (1e3, "K")
    } else {
        (1.0, "")
    };
    format!("{:.2} {prefix}{unit}", v / div)
}

/// Prints one line per second with the rate since the last line (to stderr, so that stdout
/// carries only the summary).
pub struct Ticker {
    label: String,
    last: Instant,
    last_frames: u64,
    last_bytes: u64,
    quiet: bool,
}

impl Ticker {
    /// A ticker whose first line comes one second from now.
    pub fn new(label: impl Into<String>, quiet: bool) -> Ticker {
        Ticker {
            label: label.into(),
            last: Instant::now(),
            last_frames: 0,
            last_bytes: 0,
            quiet,
        }
    }

    /// Prints a line when a second has passed since the last one.
    pub fn tick(&mut self, frames: u64, bytes: u64) {
        let now = Instant::now();
        let dt = now.duration_since(self.last);
        if dt < Duration::from_secs(1) {
            return;
        }
        let s = dt.as_secs_f64();
        if !self.quiet {
            eprintln!(
                "{}: {} pps {}",
                self.label,
                human((frames - self.last_frames) as f64 / s, ""),
                human((bytes - self.last_bytes) as f64 * 8.0 / s, "bit/s")
            );
        }
        self.last = now;
        self.last_frames = frames;
        self.last_bytes = bytes;
    }
}
