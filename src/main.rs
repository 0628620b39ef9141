//! `usnetd [CONFFILE]`: the switch daemon. Settings come from the environment or the optional
//! config file (the environment wins); `usnetd --help` lists them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Builds the settings part of `--help` from the one list the config parser uses.
fn settings_help() -> String {
    let mut s = String::from(
        "Settings (environment variables, or KEY=VALUE lines in CONFFILE; the environment wins):\n",
    );
    for (name, help) in usnetd::config::SETTINGS {
        s.push_str(&format!("  {name:<24} {help}\n"));
    }
    s.push_str("\nExample: INTERFACES=eth0 DEBUG_PORTS=eth0:TCP:22 CORES=2-3 usnetd\n");
    s
}

#[derive(Parser, Debug)]
#[command(
    name = "usnetd",
    version,
    about = "Memory-safe multi-core L4 switch: shares one NIC and one IP between the Linux kernel \
             and userspace network stacks, and firewalls the kernel.",
    after_help = settings_help()
)]
struct Args {
    /// Optional configuration file with KEY=VALUE lines (fallback for environment variables).
    conffile: Option<PathBuf>,
    /// Check the configuration and exit without touching the system.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match usnetd::config::load(args.conffile.as_deref(), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usnetd: {e}");
            return ExitCode::from(2);
        }
    };
    let level = config
        .rust_log
        .clone()
        .unwrap_or_else(|| "info".to_string());
    env_logger::Builder::new()
        .parse_filters(&level)
        .format_timestamp_millis()
        .init();
    if args.check {
        println!("usnetd: configuration is valid: {config:?}");
        return ExitCode::SUCCESS;
    }
    match usnetd::daemon::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e}");
            eprintln!("usnetd: {e}");
            ExitCode::from(1)
        }
    }
}
