//! The `vmm` command line.
//!
//! Exit codes: 0 success (the guest rebooted or powered off), 1 usage or
//! VMM error, 2 the guest crashed (kernel panic, triple fault, KVM error).

mod agent;
mod device_args;
mod logger;
mod run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmm", version, about = "A snapshot-first microVM monitor")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM in the foreground; the guest's console is on stdout.
    Run(run::RunArgs),
    /// Talk to the guest agent of a running VM over its vsock socket.
    Agent(agent::AgentArgs),
}

fn main() {
    logger::init();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Agent(args) => agent::run(args),
    };
    std::process::exit(code);
}
