//! The product commands: named sandboxes (`use`, `ls`, `status`, `stop`,
//! `rm`, `logs`) and named snapshots (`snapshot save|ls|rm|restore|gc|
//! schedule`) kept in a state directory.
//!
//! Exit codes: 0 success, 1 usage or runtime error, 3 the named sandbox or
//! snapshot does not exist, and for `use NAME -- CMD` the command's own code.
//! Errors are one line on stderr; progress is shown on a terminal only.

mod api;
pub mod args;
mod clock;
mod commands;
mod config;
mod cron;
mod disk;
mod error;
mod guest;
mod names;
mod net;
mod output;
mod process;
mod sandbox;
mod schedule;
mod snap_commands;
mod snap_remove;
mod snapshot;
mod store;

use std::path::{Path, PathBuf};

use config::ProductConfig;
use error::Result;
use output::Progress;
use store::Store;

pub use args::{LogsArgs, LsArgs, RmArgs, SnapshotArgs, StatusArgs, StopArgs, UseArgs};

/// What every command works with.
pub struct Ctx {
    pub store: Store,
    pub config: ProductConfig,
    pub progress: Progress,
}

impl Ctx {
    /// The state directory: `--state-dir`, else `VMM_STATE_DIR`, else the
    /// default.
    fn open(state_dir: Option<PathBuf>, progress: Progress) -> Result<Self> {
        let root = state_dir
            .or_else(|| std::env::var_os("VMM_STATE_DIR").map(Into::into))
            .filter(|p: &PathBuf| !p.as_os_str().is_empty())
            .unwrap_or_else(store::default_root);
        let mut ctx = Self::at(&root)?;
        ctx.progress = progress;
        Ok(ctx)
    }

    /// The state directory at `root`, without progress output (for work
    /// done in the background, such as a VMM's scheduled snapshots).
    fn at(root: &Path) -> Result<Self> {
        let store = Store::open(root)?;
        let config = ProductConfig::load(&store)?;
        Ok(Ctx {
            store,
            config,
            progress: Progress::quiet(),
        })
    }
}

/// Starts the snapshot scheduler of sandbox `name` (state directory
/// `state_dir`) in this VMM process; called by `vmm run --sandbox` before
/// any other thread starts (see [`schedule::spawn_in_vmm`]).
pub fn start_scheduler(state_dir: &Path, name: &str) -> std::result::Result<(), String> {
    names::validate("sandbox", name).map_err(|e| e.to_string())?;
    schedule::spawn_in_vmm(state_dir, name).map_err(|e| e.to_string())
}

/// A product command.
pub enum Command {
    Use(Box<UseArgs>),
    Ls(LsArgs),
    Status(StatusArgs),
    Stop(StopArgs),
    Rm(RmArgs),
    Logs(LogsArgs),
    Snapshot(SnapshotArgs),
}

/// Runs a product command on the state directory `state_dir` (when given);
/// returns the exit code.
pub fn run(cmd: Command, state_dir: Option<PathBuf>) -> i32 {
    // `snapshot gc` reaps itself and reports what it removed.
    let gc = matches!(
        &cmd,
        Command::Snapshot(SnapshotArgs {
            command: args::SnapshotCommand::Gc(_),
            ..
        })
    );
    let ctx = match Ctx::open(state_dir, Progress::new()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vmm: {e}");
            return e.exit_code();
        }
    };
    if !gc {
        // The reaper runs on every command; its trouble must not stop it.
        match snap_remove::reap(&ctx) {
            Ok(gone) => {
                for n in gone {
                    log::info!("removed expired snapshot {n}");
                }
            }
            Err(e) => log::warn!("reaping expired snapshots: {e}"),
        }
    }
    let result = match cmd {
        Command::Use(a) => commands::use_(&ctx, *a),
        Command::Ls(a) => commands::ls(&ctx, &a),
        Command::Status(a) => commands::status(&ctx, &a),
        Command::Stop(a) => commands::stop(&ctx, &a),
        Command::Rm(a) => commands::rm(&ctx, &a),
        Command::Logs(a) => commands::logs(&ctx, &a),
        Command::Snapshot(a) => snap_commands::run(&ctx, a.command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: {e}");
            e.exit_code()
        }
    }
}
