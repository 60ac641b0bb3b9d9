//! Command-line shapes of the product commands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::output::Format;
use super::snapshot::{GuestSync, SnapKind};

fn duration(text: &str) -> Result<Duration, String> {
    super::clock::parse_duration(text).map_err(|e| e.to_string())
}

/// Options every product command takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// State directory holding sandboxes and snapshots [env: VMM_STATE_DIR]
    /// [default: ~/.local/share/vmm].
    #[arg(long, value_name = "DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UseArgs {
    #[command(flatten)]
    pub common: Common,
    /// Sandbox name: 1-40 of a-z, 0-9 and '-'.
    pub name: String,
    /// Create it from this snapshot (restoring memory, processes and files).
    #[arg(long, value_name = "SNAPSHOT")]
    pub snapshot: Option<String>,
    /// Guest image of a new sandbox: STATE/images/IMAGE/{vmlinux,rootfs.ext4};
    /// `default` is the guest --kernel/--rootfs would default to.
    #[arg(long, value_name = "IMAGE", conflicts_with_all = ["kernel", "rootfs", "snapshot"])]
    pub image: Option<String>,
    /// Guest kernel for a new sandbox [env: VMM_KERNEL].
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Root filesystem image copied for a new sandbox [env: VMM_ROOTFS].
    #[arg(long, value_name = "PATH")]
    pub rootfs: Option<PathBuf>,
    /// vCPUs of a new sandbox [default: 1].
    #[arg(long)]
    pub vcpus: Option<u8>,
    /// Guest memory of a new sandbox in MiB [default: 256].
    #[arg(long)]
    pub mem_mib: Option<u64>,
    /// Kernel command line of a new sandbox.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// KEY=VALUE added to the command's environment (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the command in the guest.
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Send our standard input to the command (read to its end first).
    #[arg(short = 'i', long = "stdin")]
    pub stdin: bool,
    /// Kill the command after this long (exit code 124).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub timeout: Option<Duration>,
    /// The command and its arguments; without one, an interactive shell
    /// when stdin is a terminal.
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    pub common: Common,
    /// A sandbox; without it, the state directory and guest defaults.
    pub name: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    #[command(flatten)]
    pub common: Common,
    pub name: String,
    /// Kill the VMM at once instead of syncing the guest and stopping it.
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    #[command(flatten)]
    pub common: Common,
    pub name: String,
    /// Remove a running sandbox too (its VMM is killed).
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    #[command(flatten)]
    pub common: Common,
    pub name: String,
    /// Keep printing what is appended until the sandbox stops.
    #[arg(short, long)]
    pub follow: bool,
    /// Only the last N lines.
    #[arg(short = 'n', long, value_name = "N")]
    pub tail: Option<usize>,
    /// The exec history (commands run by `vmm use`) instead of the console.
    #[arg(long)]
    pub exec: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot a sandbox (leaves it paused unless --resume-source).
    Save(SaveArgs),
    /// List snapshots.
    Ls(SnapLsArgs),
    /// Remove snapshots.
    Rm(SnapRmArgs),
    /// Create a new sandbox from a snapshot (as `use NEW --snapshot NAME`).
    Restore(RestoreArgs),
    /// Remove expired snapshots now (this also happens on every command).
    Gc(GcArgs),
    /// Take snapshots of a sandbox automatically.
    Schedule(ScheduleArgs),
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    pub sandbox: String,
    /// Snapshot name [default: SANDBOX-YYYYMMDD-HHMMSS].
    #[arg(long)]
    pub name: Option<String>,
    /// full: memory, devices and disk; diff: memory written since the
    /// sandbox's previous snapshot, and the disk; disk: the disk only.
    #[arg(long = "type", value_enum, default_value = "full")]
    pub kind: SnapKind,
    /// Resume the sandbox after the snapshot (otherwise it stays paused
    /// until the next `vmm use`).
    #[arg(long)]
    pub resume_source: bool,
    /// Sync (and for disk snapshots freeze) guest filesystems first.
    #[arg(long, value_enum, default_value = "best-effort")]
    pub guest_sync: GuestSync,
    /// Remove the snapshot after this long (e.g. 30m, 7d) [default: from
    /// config.json's default_expires_in, else never].
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub expires_in: Option<Duration>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct SnapLsArgs {
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct SnapRmArgs {
    #[arg(required = true)]
    pub names: Vec<String>,
    /// Also remove diff snapshots built on these.
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    pub name: String,
    /// Name of the new sandbox.
    #[arg(long, value_name = "SANDBOX")]
    pub into: String,
}

#[derive(Args, Debug)]
pub struct GcArgs {}

#[derive(Args, Debug)]
pub struct ScheduleArgs {
    pub sandbox: String,
    /// 5-field cron expression in local time ("0 */2 * * *"), @hourly,
    /// @daily, @weekly, @monthly, or "@every DURATION" (e.g. "@every 30s").
    #[arg(long, value_name = "SPEC", required_unless_present = "off")]
    pub cron: Option<String>,
    /// Remove the sandbox's schedule.
    #[arg(long, conflicts_with = "cron")]
    pub off: bool,
    /// Type of the scheduled snapshots (a diff schedule's first snapshot
    /// in a run is full).
    #[arg(long = "type", value_enum, default_value = "full")]
    pub kind: SnapKind,
    /// Expiry of each scheduled snapshot.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub expires_in: Option<Duration>,
}
