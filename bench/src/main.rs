//! `usnetd-bench`: benchmarks of usnetd's data plane without any NIC.
//!
//! `usnetd-bench dataplane --workers N --rules R --frame-size S --seconds T` runs N real
//! [`usnetd_shards::worker::Worker`]s over in-memory ports (see [`dataplane`]) and prints one
//! line: `dataplane workers=N rules=R frame=S mpps=X ns_per_frame=Y` (or JSON with `--json`).
//!
//! On real (virtual) NICs: `gen` (AF_PACKET or AF_XDP traffic generator, [`gen`]), `sink`
//! (counts the generator's frames on AF_PACKET or AF_XDP, a kernel UDP socket or a usnetd
//! client channel, [`sink`]),
//! `latency` / `echo` (UDP round-trip times, [`latency`]), `addmatch` / `flows` (control plane,
//! [`ctl`]), `eval-plot` (SVG bar charts for `eval/run`, [`plot`]) and `wakeup` (what waking
//! a thread on an idle core costs, [`wakeup`]); `channel` (the switch-to-client channels
//! without a NIC, [`channel`]).

mod channel;
mod ctl;
mod dataplane;
mod gen;
mod latency;
mod netns;
mod plot;
mod probe;
mod report;
mod signals;
mod sink;
mod txring;
mod wakeup;
mod workload;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "usnetd-bench", about = "usnetd data-plane benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Workers over in-memory NIC queues and copying endpoint channels.
    Dataplane(dataplane::Args),
    /// Traffic generator on AF_PACKET or AF_XDP (UDP or TCP SYN, IPv4 or IPv6).
    Gen(gen::Args),
    /// Counts the generator's frames (AF_PACKET, kernel UDP socket, or usnetd client).
    Sink(sink::Args),
    /// UDP round-trip times to an echo responder.
    Latency(latency::Args),
    /// UDP echo responder for `latency`.
    Echo(latency::EchoArgs),
    /// AddMatch round-trip times against a running usnetd.
    Addmatch(ctl::AddMatchArgs),
    /// Opens many UDP flows from the kernel (for rule learning).
    Flows(ctl::FlowsArgs),
    /// Grouped bar chart (SVG) from `x,series,value` CSV.
    EvalPlot(plot::Args),
    /// How long waking a sleeping thread on another (idle) core takes here.
    Wakeup(wakeup::Args),
    /// The switch-to-client channels (Unix datagram, shared memory) without a NIC.
    Channel(channel::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dataplane(args) => dataplane::run(&args),
        Command::Gen(args) => gen::run(&args),
        Command::Sink(args) => sink::run(&args),
        Command::Latency(args) => latency::run(&args),
        Command::Echo(args) => latency::echo(&args),
        Command::Addmatch(args) => ctl::addmatch(&args),
        Command::Flows(args) => ctl::flows(&args),
        Command::EvalPlot(args) => plot::run(&args),
        Command::Wakeup(args) => wakeup::run(&args),
        Command::Channel(args) => channel::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usnetd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
