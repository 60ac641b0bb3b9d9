//! Command-line shapes of the product commands. The state directory
//! (`--state-dir`) is an option of the `vmm` command itself (main.rs), so it
//! may come before or after the subcommand.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::net;
use super::output::Format;
use super::snapshot::{GuestSync, SnapKind};

fn duration(text: &str) -> Result<Duration, String> {
    super::clock::parse_duration(text).map_err(|e| e.to_string())
}

/// `--env KEY=VALUE`, checked while parsing so a bad one stops `use` before
/// anything is created.
fn env_pair(text: &str) -> Result<String, String> {
    match text.split_once('=') {
        Some((key, _)) if !key.is_empty() && !key.contains('\0') => Ok(text.to_string()),
        _ => Err(format!("{text:?}: expected KEY=VALUE with a non-empty KEY")),
    }
}

#[derive(Args, Debug)]
pub struct UseArgs {
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
    /// Host TAP device for a new sandbox's network interface (opened by its
    /// VMM, which creates it when it may); required when restoring a
    /// snapshot of a VM that had one.
    #[arg(long, value_name = "TAP", value_parser = net::parse_tap)]
    pub tap: Option<String>,
    /// Guest MAC address with --tap when booting [default: random per boot].
    #[arg(long, value_name = "MAC", requires = "tap", value_parser = net::parse_mac)]
    pub mac: Option<String>,
    /// KEY=VALUE added to the command's environment (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = env_pair)]
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
    /// The command and its arguments. Without one: the guest's login shell
    /// on a terminal when stdin is one (`~.` at the start of a line
    /// disconnects, exit 255; `~~` types a `~`); `sh` reading stdin when it
    /// is a pipe or a file (`echo ls | vmm use NAME`, `vmm use NAME < script`);
    /// otherwise (`/dev/null`, a socket, ...) nothing runs: the sandbox is
    /// just made sure to be up (exit 0).
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// A sandbox; without it, the state directory and guest defaults.
    pub name: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    pub name: String,
    /// Kill the VMM at once instead of syncing the guest and stopping it.
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    pub name: String,
    /// Remove a running sandbox too (its VMM is killed).
    #[arg(short, long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
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
    /// Host TAP device of the new sandbox (required when the snapshot's VM
    /// had a network interface: the source's TAP is never reused).
    #[arg(long, value_name = "TAP", value_parser = net::parse_tap)]
    pub tap: Option<String>,
    /// Guest MAC address with --tap, for a disk-only snapshot (booted);
    /// a restored VM keeps the MAC in its snapshot.
    #[arg(long, value_name = "MAC", requires = "tap", value_parser = net::parse_mac)]
    pub mac: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Use {
        #[command(flatten)]
        a: UseArgs,
    }

    #[test]
    fn use_options_are_checked_while_parsing() {
        let ok = Use::try_parse_from([
            "use",
            "dev",
            "--env",
            "A=1",
            "--env",
            "B=",
            "--tap",
            "tap0",
            "--mac",
            "02:00:00:00:00:0A",
            "--",
            "true",
        ])
        .unwrap();
        assert_eq!(ok.a.env, ["A=1", "B="]);
        assert_eq!(ok.a.tap.as_deref(), Some("tap0"));
        assert_eq!(ok.a.mac.as_deref(), Some("02:00:00:00:00:0a"));
        for (argv, want) in [
            (
                &["use", "dev", "--env", "NOVALUE"][..],
                "expected KEY=VALUE",
            ),
            (&["use", "dev", "--env", "=x"], "non-empty KEY"),
            (&["use", "dev", "--tap", "bad/name"], "TAP name"),
            (&["use", "dev", "--mac", "02:00:00:00:00:01"], "--tap"),
            (&["use", "dev", "--tap", "t", "--mac", "zz"], "MAC"),
        ] {
            let e = Use::try_parse_from(argv).unwrap_err().to_string();
            assert!(e.contains(want), "{argv:?}: {e}");
        }
    }
}
