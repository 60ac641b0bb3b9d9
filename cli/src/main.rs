//! The `vmm` command line.
//!
//! `vmm run` exit codes: 0 success (the guest rebooted or powered off), 1
//! usage or VMM error, 2 the guest crashed (kernel panic, triple fault, KVM
//! error). The product commands (`use`, `ls`, `status`, `stop`, `rm`, `logs`,
//! `snapshot ...`): 0 success, 1 usage or runtime error, 3 not found, and the
//! command's own code for `use NAME -- CMD`.

mod agent;
mod device_args;
mod logger;
mod product;
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
    /// Run a command in a sandbox, creating it if missing.
    Use(product::UseArgs),
    /// List sandboxes.
    Ls(product::LsArgs),
    /// Show a sandbox, or the state directory and defaults.
    Status(product::StatusArgs),
    /// Stop a sandbox's VM (its disk is kept; `use` boots it again).
    Stop(product::StopArgs),
    /// Remove a sandbox and its files.
    Rm(product::RmArgs),
    /// Print a sandbox's console log or exec history.
    Logs(product::LogsArgs),
    /// Save, list, remove, restore and schedule snapshots.
    Snapshot(product::SnapshotArgs),
}

/// Subcommands whose usage errors exit with 1 (clap's own code, 2, stays for
/// `run` and `agent`).
const PRODUCT_COMMANDS: &[&str] = &["use", "ls", "status", "stop", "rm", "logs", "snapshot"];

fn main() {
    logger::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let product = std::env::args()
                .nth(1)
                .is_some_and(|a| PRODUCT_COMMANDS.contains(&a.as_str()));
            if product && e.use_stderr() {
                let _ = e.print();
                std::process::exit(1);
            }
            e.exit();
        }
    };
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Use(a) => product::run(product::Command::Use(a)),
        Command::Ls(a) => product::run(product::Command::Ls(a)),
        Command::Status(a) => product::run(product::Command::Status(a)),
        Command::Stop(a) => product::run(product::Command::Stop(a)),
        Command::Rm(a) => product::run(product::Command::Rm(a)),
        Command::Logs(a) => product::run(product::Command::Logs(a)),
        Command::Snapshot(a) => product::run(product::Command::Snapshot(a)),
    };
    std::process::exit(code);
}
