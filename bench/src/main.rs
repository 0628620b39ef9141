//! `usnetd-bench`: benchmarks of usnetd's data plane without any NIC.
//!
//! `usnetd-bench dataplane --workers N --rules R --frame-size S --seconds T` runs N real
//! [`usnetd_shards::worker::Worker`]s over in-memory ports (see [`dataplane`]) and prints one
//! line: `dataplane workers=N rules=R frame=S mpps=X ns_per_frame=Y` (or JSON with `--json`).

mod dataplane;
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Dataplane(args) => dataplane::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usnetd-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
