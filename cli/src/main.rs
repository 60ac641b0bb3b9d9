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

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "vmm", version, about = "A snapshot-first microVM monitor")]
struct Cli {
    /// State directory of the product commands, before or after the
    /// subcommand [env: VMM_STATE_DIR] [default: ~/.local/share/vmm].
    #[arg(long, value_name = "DIR", global = true)]
    state_dir: Option<PathBuf>,
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

/// The subcommand named in `args` (program name first): the first word that
/// is not an option of `vmm` itself.
fn subcommand(args: &[String]) -> Option<&str> {
    let mut words = args.iter().skip(1);
    while let Some(w) = words.next() {
        if w == "--state-dir" {
            words.next();
        } else if !w.starts_with('-') {
            return Some(w);
        }
    }
    None
}

fn main() {
    logger::init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let args: Vec<String> = std::env::args().collect();
            let product = subcommand(&args).is_some_and(|a| PRODUCT_COMMANDS.contains(&a));
            if product && e.use_stderr() {
                let _ = e.print();
                std::process::exit(1);
            }
            e.exit();
        }
    };
    let state_dir = cli.state_dir;
    if state_dir.is_some() && matches!(cli.command, Command::Run(_) | Command::Agent(_)) {
        eprintln!(
            "vmm: --state-dir applies to the product commands ({})",
            PRODUCT_COMMANDS.join(", ")
        );
        std::process::exit(2);
    }
    let product = |cmd| product::run(cmd, state_dir.clone());
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Use(a) => product(product::Command::Use(Box::new(a))),
        Command::Ls(a) => product(product::Command::Ls(a)),
        Command::Status(a) => product(product::Command::Status(a)),
        Command::Stop(a) => product(product::Command::Stop(a)),
        Command::Rm(a) => product(product::Command::Rm(a)),
        Command::Logs(a) => product(product::Command::Logs(a)),
        Command::Snapshot(a) => product(product::Command::Snapshot(a)),
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn state_dir_before_or_after_the_subcommand() {
        Cli::command().debug_assert();
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for argv in [
            &["vmm", "--state-dir", "/s", "ls"][..],
            &["vmm", "ls", "--state-dir", "/s"],
            &["vmm", "--state-dir=/s", "snapshot", "ls"],
            &["vmm", "snapshot", "ls", "--state-dir", "/s"],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_eq!(
                cli.state_dir.as_deref(),
                Some(std::path::Path::new("/s")),
                "{argv:?}"
            );
        }
        assert_eq!(
            subcommand(&args(&["vmm", "--state-dir", "ls", "rm", "x"])),
            Some("rm")
        );
        assert_eq!(
            subcommand(&args(&["vmm", "--state-dir=/s", "ls"])),
            Some("ls")
        );
        assert_eq!(subcommand(&args(&["vmm", "--version"])), None);
    }
}
