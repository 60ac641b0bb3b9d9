//! `vmm-bench`: boot, pause, snapshot and restore latency of the vmm,
//! optionally side by side with Firecracker (`FIRECRACKER_BIN`).
//!
//! Each guest size is booted once (booting is slow on some hosts), run a
//! few seconds into boot, paused, and the snapshot scenarios run on it.
//! Results go to a JSON file and a Markdown table.
//!
//! `cargo run --release -p vmm-bench -- --scenarios pause,snapshot-full`
//!
//! `vmm-bench plot` and `vmm-bench readme` turn results files into a PNG
//! and the README's performance section without measuring again; the
//! `devices` scenario measures device throughput in the nested test host.

mod boot;
mod devices;
mod error;
mod firecracker;
mod machine;
mod plot;
mod process;
mod readme;
mod ready;
mod report;
mod rng;
mod scenarios;
mod serial;
mod signals;
mod stats;
mod target;
mod tempdir;
mod vmm_target;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use error::{BenchError, Result};
use machine::MachineInfo;
use report::Record;
use scenarios::{Scenario, Settings, Slot};
use target::Target;
use vmm_target::{GuestSpec, WarmOutcome, WarmSpec};

/// When the harness started, for progress lines.
static START: OnceLock<Instant> = OnceLock::new();

/// A progress line on stderr, stamped with the time since start.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!(
            "[{:7.1}s] vmm-bench: {}",
            START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format_args!($($arg)*)
        )
    };
}

#[derive(Parser, Debug)]
#[command(
    name = "vmm-bench",
    about = "Boot and snapshot latency of the vmm (and Firecracker)"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Scenarios to run (boot is opt-in: a boot takes ~30 s on kvm_pvm;
    /// devices is opt-in: it runs in the nested test host).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "pause,snapshot-full,snapshot-diff,restore-file,clones"
    )]
    scenarios: Vec<Scenario>,
    /// Guest memory sizes, MiB.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    mem_mib: Vec<u64>,
    /// Guest vCPU counts.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    vcpus: Vec<u8>,
    /// Recorded runs per scenario (default 5; 3 for boot).
    #[arg(long)]
    runs: Option<usize>,
    /// Unrecorded runs before them (not for boot).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// JSON results file.
    #[arg(long, default_value = "target/bench/results.json")]
    json: PathBuf,
    /// Also write the Markdown table here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Also plot snapshot and restore time against memory size to this PNG
    /// (the same as `vmm-bench plot` on the JSON afterwards).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// TrueType font for the plot's text (default: DejaVu Sans).
    #[arg(long)]
    font: Option<PathBuf>,
    /// devices: MiB per transfer.
    #[arg(long, default_value_t = 32)]
    devices_mib: u64,
    /// devices: guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    devices_guest_mem_mib: u64,
    /// Guest kernel (default: resources/build-kernel.sh's, cached).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Root filesystem for the boot scenario.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Kernel command line (default: the vmm's).
    #[arg(long)]
    cmdline: Option<String>,
    /// The `vmm` CLI binary for the boot scenario (default: beside this one).
    #[arg(long)]
    vmm_bin: Option<PathBuf>,
    /// Console text that ends a guest's warm-up before the snapshot
    /// scenarios (so every size is measured at the same boot stage).
    #[arg(long, default_value = "Freeing SMP alternatives")]
    warm_marker: String,
    /// Longest wait for the warm-up marker, seconds; measurements start
    /// then, marker or not (the JSON records which).
    #[arg(long, default_value_t = 120.0)]
    warm_timeout_secs: f64,
    /// Warm up for a fixed time instead of waiting for the marker, seconds.
    #[arg(long, conflicts_with = "warm_marker")]
    warm_secs: Option<f64>,
    /// Pause/resume cycles per pause run.
    #[arg(long, default_value_t = 20)]
    pause_cycles: usize,
    /// Guest running time between pause cycles, ms.
    #[arg(long, default_value_t = 5)]
    pause_gap_ms: u64,
    /// Fraction of guest pages the host rewrites before a diff snapshot.
    #[arg(long, default_value_t = 0.1)]
    diff_fraction: f64,
    /// Guest running time between the full and the diff snapshot, ms.
    #[arg(long, default_value_t = 100)]
    diff_run_ms: u64,
    /// restore-ready: the guest program's working set, MiB.
    #[arg(long, default_value_t = 16)]
    ready_ws_mib: u64,
    /// Guests restored at once in the clones scenario.
    #[arg(long, default_value_t = 4)]
    clones: usize,
    /// Limit for a restore or a process launch, seconds.
    #[arg(long, default_value_t = 60)]
    launch_timeout_secs: u64,
    /// Limit for one boot to its root marker, seconds.
    #[arg(long, default_value_t = 180)]
    boot_timeout_secs: u64,
    /// Where the temporary directory goes (default: $TMPDIR or /tmp).
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Keep the temporary directory (snapshots, serial logs).
    #[arg(long)]
    keep_tmp: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Restores a snapshot, resumes it, prints "running <ns>", exits.
    #[command(hide = true)]
    RestoreChild {
        #[arg(long)]
        state: PathBuf,
        #[arg(long)]
        mem: PathBuf,
        #[arg(long)]
        serial: PathBuf,
    },
    /// Plots snapshot and restore time against guest memory size from
    /// results files.
    Plot {
        /// Results files (later records win over earlier ones).
        #[arg(long, required = true)]
        json: Vec<PathBuf>,
        /// The PNG to write.
        #[arg(long)]
        out: PathBuf,
        /// TrueType font for the text (default: DejaVu Sans).
        #[arg(long)]
        font: Option<PathBuf>,
    },
    /// Rewrites the README's performance section (between `<!-- perf:begin -->`
    /// and `<!-- perf:end -->`) from results files.
    Readme {
        /// Results files.
        #[arg(long, required = true)]
        json: Vec<PathBuf>,
        /// The README to update.
        #[arg(long, default_value = "README.md")]
        readme: PathBuf,
        /// Draw the plot to this PNG and link it from the section.
        #[arg(long)]
        png: Option<PathBuf>,
        /// TrueType font for the plot's text (default: DejaVu Sans).
        #[arg(long)]
        font: Option<PathBuf>,
        /// A sentence about the conditions, e.g. the machine's load.
        #[arg(long)]
        note: Option<String>,
    },
}

fn main() {
    let args = Args::parse();
    let tool = |name: &str, r: Result<()>| {
        if let Err(e) = r {
            eprintln!("vmm-bench {name}: {e}");
            std::process::exit(1);
        }
    };
    match &args.command {
        Some(Command::RestoreChild { state, mem, serial }) => {
            tool(
                "restore-child",
                vmm_target::restore_child(state, mem, serial),
            );
            return;
        }
        Some(Command::Plot { json, out, font }) => {
            tool("plot", plot_files(json, out, font.as_deref()));
            return;
        }
        Some(Command::Readme {
            json,
            readme,
            png,
            font,
            note,
        }) => {
            tool(
                "readme",
                readme_files(
                    json,
                    readme,
                    png.as_deref(),
                    font.as_deref(),
                    note.as_deref(),
                ),
            );
            return;
        }
        None => {}
    }
    START.get_or_init(Instant::now);
    signals::install();
    match run(&args) {
        Ok(failed) => std::process::exit(if failed { 3 } else { 0 }),
        Err(e) => {
            eprintln!("vmm-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// Plots the records of `json` files to `out`.
fn plot_files(json: &[PathBuf], out: &Path, font: Option<&Path>) -> Result<()> {
    let records = report::read_json(json)?;
    plot_records(&records, out, font)
}

fn plot_records(records: &[Record], out: &Path, font: Option<&Path>) -> Result<()> {
    let font = plot::find_font(font)?;
    plot::write_png(
        &plot::series(records),
        "vmm: snapshot and restore time vs guest memory",
        &plot::subtitle(records),
        &font,
        out,
    )?;
    eprintln!("vmm-bench: plot in {}", out.display());
    Ok(())
}

/// Regenerates the README section (and the plot, when `png` is given).
fn readme_files(
    json: &[PathBuf],
    readme_path: &Path,
    png: Option<&Path>,
    font: Option<&Path>,
    note: Option<&str>,
) -> Result<()> {
    let records = report::read_json(json)?;
    // Check the markers before drawing anything.
    let text =
        std::fs::read_to_string(readme_path).map_err(BenchError::file("reading", readme_path))?;
    readme::replace_section(&text, "").map_err(|source| BenchError::Readme {
        path: readme_path.to_path_buf(),
        source,
    })?;
    let readme_dir = readme_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let png_link = match png {
        Some(p) => {
            plot_records(&records, p, font)?;
            Some(readme::relative_link(readme_dir, p))
        }
        None => None,
    };
    let argv: Vec<String> = std::env::args().collect();
    let body = readme::section(&readme::SectionInput {
        records: &records,
        json,
        png_link,
        this_command: readme::shell_line(&argv),
        note,
    });
    readme::update_file(readme_path, &body)?;
    eprintln!("vmm-bench: updated {}", readme_path.display());
    Ok(())
}

/// Runs everything; returns whether any scenario failed.
fn run(args: &Args) -> Result<bool> {
    let needs_kernel = args.scenarios.iter().any(|s| *s != Scenario::Devices);
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None if needs_kernel => build_kernel()?,
        None => PathBuf::new(),
    };
    let mut tmp =
        tempdir::TempDir::new_in(&args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir))?;
    if args.keep_tmp {
        tmp.keep();
        eprintln!("vmm-bench: keeping {}", tmp.path().display());
    }
    let fc_bin = std::env::var_os("FIRECRACKER_BIN").map(PathBuf::from);
    let machine = MachineInfo::collect(tmp.path(), fc_bin.as_deref());
    let mut scenarios = args.scenarios.clone();
    scenarios.sort();
    scenarios.dedup();

    let mut records = Vec::new();
    let sizes: Vec<(u64, u8)> = if needs_kernel {
        args.mem_mib
            .iter()
            .flat_map(|&m| args.vcpus.iter().map(move |&v| (m, v)))
            .collect()
    } else {
        Vec::new()
    };
    for &(mem_mib, vcpus) in &sizes {
        if signals::interrupted() {
            break;
        }
        let spec = GuestSpec {
            kernel: kernel.clone(),
            mem_mib,
            vcpus,
            cmdline: args.cmdline.clone(),
        };
        let work = tmp.subdir(&format!("{mem_mib}m-{vcpus}c"))?;
        let ctx = Ctx {
            args,
            machine: &machine,
            spec: &spec,
            fc_bin: fc_bin.as_deref(),
        };
        if scenarios.contains(&Scenario::Boot) {
            records.extend(ctx.boot(&work)?);
        }
        if scenarios.contains(&Scenario::RestoreReady) && !signals::interrupted() {
            records.push(ctx.restore_ready(&work));
        }
        let snap: Vec<Scenario> = scenarios
            .iter()
            .copied()
            .filter(|s| {
                !matches!(
                    s,
                    Scenario::Boot | Scenario::RestoreReady | Scenario::Devices
                )
            })
            .collect();
        if !snap.is_empty() {
            records.extend(ctx.snapshot_scenarios(&snap, &work));
        }
        let _ = std::fs::remove_dir_all(&work);
        // Results so far survive a later crash or interrupt.
        report::write_json(&args.json, &records)?;
    }

    if scenarios.contains(&Scenario::Devices) && !signals::interrupted() {
        let settings = devices::DeviceSettings {
            runs: args.runs.unwrap_or(3),
            mib: args.devices_mib,
            guest_mem_mib: args.devices_guest_mem_mib,
        };
        progress!(
            "devices: {} rounds of {} MiB in the nested test host ({})",
            settings.runs,
            settings.mib,
            devices::NESTED_LABEL
        );
        let record = devices::run(&settings, &machine);
        if let Some(e) = &record.error {
            progress!("devices failed: {e}");
        }
        records.push(record);
    }

    report::write_json(&args.json, &records)?;
    if let Some(png) = &args.plot {
        if let Err(e) = plot_records(&records, png, args.font.as_deref()) {
            progress!("plot failed: {e}");
        }
    }
    let md = report::markdown(&records);
    print!("{md}");
    if let Some(path) = &args.markdown {
        report::write_file(path, &md)?;
    }
    eprintln!("vmm-bench: results in {}", args.json.display());
    if signals::interrupted() {
        return Err(BenchError::Interrupted);
    }
    Ok(records.iter().any(|r| r.error.is_some()))
}

/// The guest kernel from the project's cached build script.
fn build_kernel() -> Result<PathBuf> {
    let script = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/build-kernel.sh"
    ));
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(BenchError::file("running", script))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.lines().last() {
        Some(line) if out.status.success() && Path::new(line.trim()).is_file() => {
            Ok(PathBuf::from(line.trim()))
        }
        _ => Err(BenchError::Setup(format!(
            "{} failed ({}); pass --kernel",
            script.display(),
            out.status
        ))),
    }
}

/// What every scenario of one guest size needs.
struct Ctx<'a> {
    args: &'a Args,
    machine: &'a MachineInfo,
    spec: &'a GuestSpec,
    fc_bin: Option<&'a Path>,
}

impl Ctx<'_> {
    fn record(
        &self,
        scenario: Scenario,
        target: &'static str,
        runs: usize,
        warmup: usize,
        result: Result<stats::Metrics>,
        details: serde_json::Value,
    ) -> Record {
        let (metrics, error) = match result {
            Ok(m) => (report::metrics_out(&m), None),
            Err(e) => (Default::default(), Some(e.to_string())),
        };
        if let Some(e) = &error {
            progress!(
                "{} on {target} ({} MiB, {} vCPU) failed: {e}",
                scenario.name(),
                self.spec.mem_mib,
                self.spec.vcpus
            );
        }
        Record {
            scenario: scenario.name().to_string(),
            target: target.to_string(),
            mem_mib: self.spec.mem_mib,
            vcpus: self.spec.vcpus,
            runs,
            warmup,
            error,
            metrics,
            notes: scenario.notes().iter().map(ToString::to_string).collect(),
            details,
            machine: self.machine.clone(),
            label: None,
        }
    }

    /// The command line both VMMs give the guest: the vmm's own.
    fn full_cmdline(&self) -> Result<String> {
        let mut cfg = vmm::VmConfig::new(&self.spec.kernel);
        cfg.cmdline = self.spec.cmdline.clone();
        vmm::builder::kernel_cmdline(&cfg, &[]).map_err(BenchError::vmm("kernel command line"))
    }

    fn boot(&self, work: &Path) -> Result<Vec<Record>> {
        let runs = self.args.runs.unwrap_or(3);
        let vmm_bin = match &self.args.vmm_bin {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .map_err(BenchError::io("locating vmm-bench"))?
                .with_file_name("vmm"),
        };
        let settings = boot::BootSettings {
            runs,
            timeout: Duration::from_secs(self.args.boot_timeout_secs),
            rootfs: self.args.rootfs.clone(),
            vmm_bin: vmm_bin.clone(),
            fc_cmdline: self.full_cmdline()?,
            fc_bin: self.fc_bin.map(Path::to_path_buf),
        };
        let details = serde_json::json!({
            "vmm_bin": vmm_bin,
            "rootfs": self.args.rootfs,
            "root_marker": boot::root_marker(self.args.rootfs.is_some()),
        });
        let results = if vmm_bin.is_file() {
            boot::run(self.spec, &settings, work)
        } else {
            let e = BenchError::Setup(format!(
                "{} not found: build it (cargo build --release -p vmm-cli) or pass --vmm-bin",
                vmm_bin.display()
            ));
            vec![("vmm", Err(e))]
        };
        Ok(results
            .into_iter()
            .map(|(target, r)| self.record(Scenario::Boot, target, runs, 0, r, details.clone()))
            .collect())
    }

    /// The restore-ready scenario, on its own guest (vmm only).
    fn restore_ready(&self, work: &Path) -> Record {
        let a = self.args;
        let settings = ready::ReadySettings {
            runs: a.runs.unwrap_or(5),
            warmup: a.warmup,
            ws_mib: a.ready_ws_mib,
            boot_timeout: Duration::from_secs(a.boot_timeout_secs),
            ready_timeout: Duration::from_secs(a.launch_timeout_secs),
        };
        progress!(
            "restore-ready ({} MiB, {} vCPU): booting the toucher guest ({} MiB working set)",
            self.spec.mem_mib,
            self.spec.vcpus,
            settings.ws_mib
        );
        let result = work_dir(work, "ready").and_then(|d| ready::run(self.spec, &settings, &d));
        let (result, details) = match result {
            Ok((m, details)) => (Ok(m), details),
            Err(e) => (Err(e), serde_json::Value::Null),
        };
        self.record(
            Scenario::RestoreReady,
            "vmm",
            settings.runs,
            settings.warmup,
            result,
            details,
        )
    }

    fn snapshot_scenarios(&self, scenarios: &[Scenario], work: &Path) -> Vec<Record> {
        let a = self.args;
        let settings = Settings {
            runs: a.runs.unwrap_or(5),
            warmup: a.warmup,
            pause_cycles: a.pause_cycles,
            pause_gap: Duration::from_millis(a.pause_gap_ms),
            diff_fraction: a.diff_fraction,
            diff_run: Duration::from_millis(a.diff_run_ms),
            clones: a.clones,
            restore_check: Duration::from_millis(500),
            seed: 0x5eed,
        };
        let warm = match a.warm_secs {
            Some(secs) => WarmSpec {
                marker: None,
                max: Duration::from_secs_f64(secs.max(0.0)),
            },
            None => WarmSpec {
                marker: Some(a.warm_marker.clone()),
                max: Duration::from_secs_f64(a.warm_timeout_secs.max(0.0)),
            },
        };
        let launch = Duration::from_secs(a.launch_timeout_secs);

        let mut slots = Vec::new();
        let mut warmups: Vec<(&'static str, serde_json::Value)> = Vec::new();
        let mut records = Vec::new();
        let fail_all = |target: &'static str, e: BenchError, records: &mut Vec<Record>| {
            let msg = format!("guest boot/warm-up failed: {e}");
            for &s in scenarios {
                let r = Err(BenchError::Setup(msg.clone()));
                records.push(self.record(
                    s,
                    target,
                    settings.runs,
                    settings.warmup,
                    r,
                    serde_json::Value::Null,
                ));
            }
        };
        let dir = |name: &str| work_dir(work, name);

        progress!(
            "booting the vmm guest ({} MiB, {} vCPU)",
            self.spec.mem_mib,
            self.spec.vcpus
        );
        match dir("vmm").and_then(|d| {
            Ok((
                vmm_target::VmmTarget::boot(self.spec, &warm, &d, launch)?,
                d,
            ))
        }) {
            Ok(((t, w), d)) => {
                progress!("vmm guest warmed up: {}", warm_json(&w));
                warmups.push(("vmm", warm_json(&w)));
                slots.push(Slot {
                    target: Box::new(t) as Box<dyn Target>,
                    dir: d,
                    base: None,
                });
            }
            Err(e) => fail_all("vmm", e, &mut records),
        }
        if let Some(bin) = self.fc_bin {
            progress!("booting the firecracker guest");
            let booted = self.full_cmdline().and_then(|cmdline| {
                let d = dir("firecracker")?;
                let t = firecracker::FirecrackerTarget::boot(
                    bin, self.spec, &cmdline, &warm, &d, launch,
                )?;
                Ok((t, d))
            });
            match booted {
                Ok(((t, w), d)) => {
                    progress!("firecracker guest warmed up: {}", warm_json(&w));
                    warmups.push(("firecracker", warm_json(&w)));
                    slots.push(Slot {
                        target: Box::new(t),
                        dir: d,
                        base: None,
                    });
                }
                Err(e) => fail_all("firecracker", e, &mut records),
            }
        }

        for &scenario in scenarios {
            if slots.is_empty() || signals::interrupted() {
                break;
            }
            progress!(
                "{} ({} MiB, {} vCPU)",
                scenario.name(),
                self.spec.mem_mib,
                self.spec.vcpus
            );
            let results = scenarios::run(scenario, &mut slots, &settings);
            for (slot, result) in slots.iter().zip(results) {
                let name = slot.target.name();
                let warm = warmups.iter().find(|w| w.0 == name).map(|w| w.1.clone());
                let details = serde_json::json!({
                    "warm_up": warm,
                    "pause_cycles": settings.pause_cycles,
                    "pause_gap_ms": a.pause_gap_ms,
                    "diff_fraction": settings.diff_fraction,
                    "diff_run_ms": a.diff_run_ms,
                    "clones": settings.clones,
                    "dirty_page_tracking": true,
                });
                records.push(self.record(
                    scenario,
                    name,
                    settings.runs,
                    settings.warmup,
                    result,
                    details,
                ));
            }
        }
        for slot in &mut slots {
            slot.target.shutdown();
        }
        records
    }
}

/// `work/name`, created.
fn work_dir(work: &Path, name: &str) -> Result<PathBuf> {
    let d = work.join(name);
    std::fs::create_dir_all(&d).map_err(BenchError::file("creating", &d))?;
    Ok(d)
}

fn warm_json(w: &WarmOutcome) -> serde_json::Value {
    serde_json::to_value(w).unwrap_or(serde_json::Value::Null)
}
