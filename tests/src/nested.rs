//! Running a shell script inside the nested test host: QEMU (TCG, AMD SVM emulated) boots the
//! Debian cloud kernel whose initramfs is the base archive plus a per-test archive carrying the
//! script, the `vmm` binary with its shared libraries, the guest kernel and rootfs.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::artifacts::{artifacts, nested_host};
use crate::binaries::vmm_binary;
use crate::cpio::CpioWriter;
use crate::error::{HarnessError, Result};
use crate::lock::FileLock;
use crate::paths::{cache_dir, scratch_dir};
use crate::process::{describe, tail, wait_watched, WaitEnd};

/// Where the guest kernel is inside L1.
pub const NESTED_GUEST_KERNEL: &str = "/guest/vmlinux";
/// Where the guest root filesystem is inside L1.
pub const NESTED_GUEST_ROOTFS: &str = "/guest/rootfs.ext4";
/// Where the `vmm` binary is inside L1 (on PATH).
pub const NESTED_VMM: &str = "/usr/bin/vmm";
/// Guest kernel command line for an ordinary KVM host such as L1 (virtio-mmio devices are added
/// by the VMM).
pub const GUEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw quiet";

/// Time QEMU gets beyond the script's own timeout to boot L1 and power off.
const BOOT_MARGIN: Duration = Duration::from_secs(60);

/// L1's init writes a heartbeat line to its second serial port every 5 s; by default this long
/// without one means L1's kernel hung (QEMU's emulated SVM does that now and then, before or
/// during any test step).
const HEARTBEAT_SILENCE: Duration = Duration::from_secs(90);

/// How the test host itself failed a run, independently of what the script did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostFailure {
    /// QEMU exited without the script's `NESTED-EXIT` (L1's kernel panicked or QEMU died).
    Died,
    /// No heartbeat from L1 for [`NestedOptions::heartbeat_silence`]; QEMU was killed.
    Hung,
}

impl std::fmt::Display for HostFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostFailure::Died => f.write_str("L1 died before the script finished"),
            HostFailure::Hung => f.write_str("L1 hung (its heartbeat stopped)"),
        }
    }
}

/// What to put into a nested run.
#[derive(Debug, Clone)]
pub struct NestedOptions {
    /// Names the log and scratch files.
    pub name: String,
    /// Limit for /test/run.sh; QEMU as a whole is killed after this plus a boot margin.
    pub timeout: Duration,
    /// Include the `vmm` binary (built if needed) and its libraries.
    pub with_vmm: bool,
    /// Include the guest kernel and rootfs (built if needed).
    pub with_guest: bool,
    /// Extra files: (host path, absolute path inside L1). The host file's mode is kept.
    pub files: Vec<(PathBuf, String)>,
    /// Extra dynamically linked programs: (host path, absolute path inside L1); the shared
    /// libraries and loader `ldd` lists come along at their host paths.
    pub programs: Vec<(PathBuf, String)>,
    /// Appended to L1's kernel command line.
    pub cmdline_extra: String,
    /// L1 memory.
    pub mem_mib: u32,
    /// L1 vCPUs.
    pub cpus: u32,
    /// How long L1 may go without a heartbeat before the run counts as hung.
    pub heartbeat_silence: Duration,
}

impl NestedOptions {
    /// Defaults: vmm and guest included, 5 minute script timeout, 2 GiB and 2 vCPUs for L1.
    pub fn new(name: &str) -> Self {
        NestedOptions {
            name: name.to_string(),
            timeout: Duration::from_secs(300),
            with_vmm: true,
            with_guest: true,
            files: Vec::new(),
            programs: Vec::new(),
            cmdline_extra: String::new(),
            mem_mib: 2048,
            cpus: 2,
            heartbeat_silence: HEARTBEAT_SILENCE,
        }
    }

    /// Sets the script timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Leaves the `vmm` binary out (for tests of the nested host itself).
    pub fn without_vmm(mut self) -> Self {
        self.with_vmm = false;
        self
    }

    /// Leaves the guest kernel and rootfs out.
    pub fn without_guest(mut self) -> Self {
        self.with_guest = false;
        self
    }

    /// Adds a host file at `guest_path` inside L1.
    pub fn file(mut self, host: impl Into<PathBuf>, guest_path: &str) -> Self {
        self.files.push((host.into(), guest_path.to_string()));
        self
    }

    /// Adds a host program at `guest_path` inside L1, with the shared libraries it needs.
    pub fn program(mut self, host: impl Into<PathBuf>, guest_path: &str) -> Self {
        self.programs.push((host.into(), guest_path.to_string()));
        self
    }
}

/// One line of L1's serial console with the time since QEMU started.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Time since QEMU was spawned.
    pub at: Duration,
    /// The line, without the line terminator.
    pub text: String,
}

/// The result of a nested run that finished (a timeout panics instead).
#[derive(Debug)]
pub struct NestedRun {
    /// The run's name.
    pub name: String,
    /// Every serial console line.
    pub lines: Vec<LogLine>,
    /// `NESTED-EXIT`: the script's exit status (None when L1 died before printing it).
    pub exit_code: Option<i32>,
    /// The serial log file.
    pub log_path: PathBuf,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
    /// Wall time from QEMU spawn to its exit.
    pub elapsed: Duration,
}

/// Removes terminal escape sequences (SeaBIOS and the kernel clear the screen on the serial
/// console) and carriage returns.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                // CSI: parameters and intermediates up to a final byte in '@'..='~'; any other
                // escape is two characters (such as ESC c, reset).
                if chars.next() == Some('[') {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

/// Finds `KEY=` in `line` at the start or after a non-word character (kernel messages may share
/// a line with the script's output) and returns what follows, trimmed.
fn marker_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("{key}=");
    let mut from = 0;
    while let Some(pos) = line[from..].find(&needle) {
        let at = from + pos;
        let boundary = line[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '-'));
        if boundary {
            return Some(line[at + needle.len()..].trim());
        }
        from = at + needle.len();
    }
    None
}

impl NestedRun {
    /// The whole serial log.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.text);
            s.push('\n');
        }
        s
    }

    /// The last `n` log lines.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log(), n)
    }

    /// The value of the first `KEY=VALUE` line the script (or init) printed.
    pub fn marker(&self, key: &str) -> Option<String> {
        self.lines
            .iter()
            .find_map(|l| marker_value(&l.text, key))
            .map(str::to_string)
    }

    /// The values of every `KEY=VALUE` line, in order.
    pub fn markers(&self, key: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter_map(|l| marker_value(&l.text, key))
            .map(str::to_string)
            .collect()
    }

    /// When the first line containing `needle` appeared (since QEMU spawn).
    pub fn time_of(&self, needle: &str) -> Option<Duration> {
        self.lines
            .iter()
            .find(|l| l.text.contains(needle))
            .map(|l| l.at)
    }

    /// Whether L1 had a working /dev/kvm (printed by the nested init).
    pub fn l1_kvm(&self) -> bool {
        self.marker("NESTED-L1-KVM").as_deref() == Some("yes")
    }

    /// A failure message with the log tail and path.
    pub fn failure(&self, what: &str) -> String {
        format!(
            "nested run '{}': {what}\n--- last serial lines ---\n{}\n--- qemu stderr ---\n{}\n\
             (full serial log: {})",
            self.name,
            self.tail(60),
            self.qemu_stderr.trim(),
            self.log_path.display()
        )
    }

    /// Panics unless the script exited with status 0.
    pub fn assert_success(&self) {
        match self.exit_code {
            Some(0) => {}
            Some(code) => panic!("{}", self.failure(&format!("script exited with {code}"))),
            None => panic!("{}", self.failure("no NESTED-EXIT line (L1 crashed?)")),
        }
    }

    /// Panics unless `KEY=VALUE` was printed with exactly this value.
    pub fn assert_marker(&self, key: &str, value: &str) {
        let got = self.marker(key);
        if got.as_deref() != Some(value) {
            panic!(
                "{}",
                self.failure(&format!("expected {key}={value}, got {got:?}"))
            );
        }
    }
}

/// The shared libraries and loader `ldd` lists for `binary` (none for a static binary).
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let mut cmd = Command::new("ldd");
    cmd.arg(binary);
    let out = cmd.output().map_err(|source| HarnessError::Spawn {
        command: describe(&cmd),
        source,
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(HarnessError::CommandFailed {
            command: describe(&cmd),
            status: out.status,
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        if path.starts_with("not found") {
            return Err(HarnessError::BadOutput {
                command: describe(&cmd),
                detail: format!("missing library: {line}"),
            });
        }
        let path = path.split(" (").next().unwrap_or("").trim();
        // linux-vdso has no file; everything else is an absolute path.
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn mode_of(path: &Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .map_err(|e| HarnessError::io("stat", path, e))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Writes the initrd: the base archive followed by this run's archive.
fn write_initrd(out_path: &Path, base: &Path, script: &str, opts: &NestedOptions) -> Result<()> {
    let file = File::create(out_path).map_err(|e| HarnessError::io("create", out_path, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut base_file = File::open(base).map_err(|e| HarnessError::io("open", base, e))?;
    std::io::copy(&mut base_file, &mut out).map_err(|e| HarnessError::io("copy", base, e))?;

    let mut cpio = CpioWriter::new(out);
    cpio.file_bytes("/test/run.sh", script.as_bytes(), 0o755)?;
    let mut programs = opts.programs.clone();
    if opts.with_vmm {
        programs.push((vmm_binary(), NESTED_VMM.to_string()));
    }
    let mut libraries = BTreeSet::new();
    for (host, guest) in &programs {
        cpio.file_from(guest, host, 0o755)?;
        libraries.extend(shared_libraries(host)?);
    }
    for lib in libraries {
        cpio.file_from(&lib.to_string_lossy(), &lib, 0o755)?;
    }
    if opts.with_guest {
        let art = artifacts();
        cpio.file_from(NESTED_GUEST_KERNEL, &art.kernel, 0o644)?;
        cpio.file_from(NESTED_GUEST_ROOTFS, &art.rootfs, 0o644)?;
    }
    for (host, guest) in &opts.files {
        cpio.file_from(guest, host, mode_of(host)?)?;
    }
    cpio.finish()?
        .flush()
        .map_err(|e| HarnessError::io("write", out_path, e))
}

/// Runs `script` as /test/run.sh inside a fresh nested host and returns the serial log and exit
/// code. Only one nested QEMU runs at a time across all test processes. A run that exceeds its
/// timeout is killed and panics with the log tail.
pub fn run_nested(script: &str, opts: NestedOptions) -> NestedRun {
    try_run_nested(script, &opts).unwrap_or_else(|e| panic!("nested run '{}': {e}", opts.name))
}

/// Distinguishes runs of one process.
static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// [`run_nested`] returning harness errors instead of panicking; a timeout still panics.
///
/// A run the test host itself failed (L1 died or hung, see [`HostFailure`]) says so on stderr
/// and is run once more in a fresh L1; the script's own failures are never retried.
pub fn try_run_nested(script: &str, opts: &NestedOptions) -> Result<NestedRun> {
    let host = nested_host();
    let dir = scratch_dir().join("nested");
    std::fs::create_dir_all(&dir).map_err(|e| HarnessError::io("create directory", &dir, e))?;
    let mut first_failure = None;
    loop {
        let run_id = format!(
            "{}-{}-{}",
            opts.name,
            std::process::id(),
            RUN_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let initrd = ScratchFile(dir.join(format!("{run_id}.initrd")));
        let heartbeat = ScratchFile(dir.join(format!("{run_id}.heartbeat")));
        let log_path = dir.join(format!("{run_id}.log"));
        write_initrd(&initrd.0, &host.base_initrd, script, opts)?;

        let _qemu_lock = FileLock::acquire(&cache_dir().join(".lock-nested-qemu"))?;
        let (mut run, outcome) = run_qemu(&host.kernel, &initrd.0, &heartbeat.0, &log_path, opts)?;
        let failure = match outcome {
            Ok(()) => return Ok(run),
            Err(failure) => failure,
        };
        let what = failure.to_string();
        eprintln!(
            "{}",
            run.failure(&format!("{what}: the test host failed, not the script"))
        );
        if let Some(first) = first_failure {
            run.name = format!("{} (second attempt; the first: {first})", run.name);
            return match failure {
                HostFailure::Hung => panic!("{}", run.failure(&what)),
                HostFailure::Died => Ok(run),
            };
        }
        eprintln!(
            "nested run '{}': running it once more in a fresh L1",
            opts.name
        );
        first_failure = Some(what);
    }
}

/// A large scratch file removed when dropped, also on panic (kept when `VMM_TESTS_KEEP` is set).
struct ScratchFile(PathBuf);

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if std::env::var_os("VMM_TESTS_KEEP").is_none() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

/// Runs one QEMU; the outcome says whether L1 itself failed the run.
fn run_qemu(
    kernel: &Path,
    initrd: &Path,
    heartbeat: &Path,
    log_path: &Path,
    opts: &NestedOptions,
) -> Result<(NestedRun, std::result::Result<(), HostFailure>)> {
    let script_secs = opts.timeout.as_secs().max(1);
    let append = format!(
        "console=ttyS0 panic=-1 quiet nested.timeout={script_secs} {}",
        opts.cmdline_extra
    );
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max", "-nographic", "-no-reboot"])
        .args([
            "-m",
            &opts.mem_mib.to_string(),
            "-smp",
            &opts.cpus.to_string(),
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append.trim()])
        // ttyS0 as -nographic would have it; ttyS1: L1's heartbeat.
        .args(["-serial", "mon:stdio", "-serial"])
        .arg(format!("file:{}", heartbeat.display()));
    let what = describe(&cmd);
    let log_file = File::create(log_path).map_err(|e| HarnessError::io("create", log_path, e))?;

    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            command: what.clone(),
            source,
        })?;

    let lines = Arc::new(Mutex::new(Vec::<LogLine>::new()));
    let stdout = child.stdout.take();
    let reader_lines = Arc::clone(&lines);
    let reader = std::thread::spawn(move || {
        let Some(stdout) = stdout else { return };
        let mut log = BufWriter::new(log_file);
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let at = start.elapsed();
            let text = strip_escapes(String::from_utf8_lossy(&buf).trim_end_matches('\n'));
            let _ = writeln!(log, "[{:8.3}] {text}", at.as_secs_f64());
            let _ = log.flush();
            if let Ok(mut lines) = reader_lines.lock() {
                lines.push(LogLine { at, text });
            }
        }
    });
    let stderr = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });

    let beats = HeartbeatWatch::new(heartbeat);
    let end = wait_watched(&mut child, opts.timeout + BOOT_MARGIN, &what, || {
        beats.silent_for() >= opts.heartbeat_silence
    })?;
    let elapsed = start.elapsed();
    let _ = reader.join();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let lines = match Arc::try_unwrap(lines) {
        Ok(m) => m.into_inner().unwrap_or_default(),
        Err(shared) => shared.lock().map(|l| l.clone()).unwrap_or_default(),
    };
    let exit_code = lines
        .iter()
        .find_map(|l| marker_value(&l.text, "NESTED-EXIT"))
        .and_then(|v| v.parse().ok());
    let run = NestedRun {
        name: opts.name.clone(),
        lines,
        exit_code,
        log_path: log_path.to_path_buf(),
        qemu_stderr,
        elapsed,
    };
    let status = match end {
        WaitEnd::Exited(status) => status,
        WaitEnd::Stalled => return Ok((run, Err(HostFailure::Hung))),
        WaitEnd::TimedOut => panic!(
            "{}",
            run.failure(&format!(
                "QEMU killed after {:.0}s (script timeout {}s + boot margin)",
                elapsed.as_secs_f64(),
                script_secs
            ))
        ),
    };
    if run.exit_code.is_some() {
        return Ok((run, Ok(())));
    }
    // QEMU could not start L1 at all: not something a second attempt changes.
    if !status.success() && run.lines.is_empty() {
        return Err(HarnessError::CommandFailed {
            command: what,
            status,
            output: run.failure("QEMU failed"),
        });
    }
    Ok((run, Err(HostFailure::Died)))
}

/// When L1's heartbeat file last grew.
struct HeartbeatWatch<'a> {
    path: &'a Path,
    state: Mutex<(u64, Instant)>,
}

impl<'a> HeartbeatWatch<'a> {
    fn new(path: &'a Path) -> Self {
        Self::starting_at(path, Instant::now())
    }

    fn starting_at(path: &'a Path, start: Instant) -> Self {
        HeartbeatWatch {
            path,
            state: Mutex::new((0, start)),
        }
    }

    /// Time since the file last grew (since the watch began if it never did).
    fn silent_for(&self) -> Duration {
        self.silent_at(Instant::now())
    }

    fn silent_at(&self, now: Instant) -> Duration {
        let len = std::fs::metadata(self.path).map(|m| m.len()).unwrap_or(0);
        let Ok(mut state) = self.state.lock() else {
            return Duration::ZERO;
        };
        if len != state.0 {
            *state = (len, now);
        }
        now.saturating_duration_since(state.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_found_after_escapes_and_not_inside_words() {
        assert_eq!(marker_value("KVM_OK=1", "KVM_OK"), Some("1"));
        let line = strip_escapes("\x1bc\x1b[?7l\x1b[2JNESTED-L1-KVM=yes\r");
        assert_eq!(line, "NESTED-L1-KVM=yes");
        assert_eq!(marker_value(&line, "NESTED-L1-KVM"), Some("yes"));
        assert_eq!(marker_value("[    3.1] x: KVM_OK=1", "KVM_OK"), Some("1"));
        assert_eq!(marker_value("MY_KVM_OK=1", "KVM_OK"), None);
        assert_eq!(marker_value("x MY_KVM_OK=1 KVM_OK=2", "KVM_OK"), Some("2"));
        assert_eq!(marker_value("nothing", "KVM_OK"), None);
    }

    #[test]
    fn heartbeat_silence_counts_from_the_last_growth_of_the_file() {
        let dir = std::env::temp_dir().join(format!("vmm-hb-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("heartbeat");
        let t0 = Instant::now();
        let watch = HeartbeatWatch::starting_at(&path, t0);
        let s = Duration::from_secs;
        // No file yet: silent since the watch began.
        assert_eq!(watch.silent_at(t0 + s(10)), s(10));
        std::fs::write(&path, "hb\n").unwrap();
        assert_eq!(watch.silent_at(t0 + s(20)), Duration::ZERO);
        assert_eq!(watch.silent_at(t0 + s(25)), s(5));
        std::fs::write(&path, "hb\nhb\n").unwrap();
        assert_eq!(watch.silent_at(t0 + s(30)), Duration::ZERO);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn run_helpers() {
        let run = NestedRun {
            name: "t".into(),
            lines: vec![
                LogLine {
                    at: Duration::from_secs(1),
                    text: "A=1".into(),
                },
                LogLine {
                    at: Duration::from_secs(2),
                    text: "A=2".into(),
                },
                LogLine {
                    at: Duration::from_secs(3),
                    text: "NESTED-L1-KVM=yes".into(),
                },
            ],
            exit_code: Some(0),
            log_path: PathBuf::from("/nonexistent"),
            qemu_stderr: String::new(),
            elapsed: Duration::from_secs(3),
        };
        assert_eq!(run.marker("A").as_deref(), Some("1"));
        assert_eq!(run.markers("A"), ["1", "2"]);
        assert_eq!(run.time_of("A=2"), Some(Duration::from_secs(2)));
        assert!(run.l1_kvm());
        run.assert_success();
        run.assert_marker("A", "1");
        assert_eq!(run.tail(1), "NESTED-L1-KVM=yes");
    }

    #[test]
    fn ldd_lists_loader_and_libc() {
        let libs = shared_libraries(Path::new("/bin/ls")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
        assert!(shared_libraries(Path::new("/bin/busybox"))
            .unwrap()
            .is_empty());
    }
}
