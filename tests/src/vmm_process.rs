//! A `vmm` child process for direct (this machine's KVM) tests: its output goes to files in the
//! test's scratch directory, and it is killed when the guard is dropped, so a failing test never
//! leaves a VMM (and its guest memory) behind.

use std::fs;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::api::api;
use crate::binaries::vmm_binary;
use crate::paths::utf8;

/// How often waiting loops poll.
const POLL: Duration = Duration::from_millis(20);

/// A running `vmm`; killed and reaped on drop.
#[derive(Debug)]
pub struct VmmProcess {
    child: Child,
    name: String,
    stderr: PathBuf,
    started: Instant,
}

/// How a process ended, in words (seccomp's SIGSYS named as such).
pub fn describe_exit(st: ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (_, Some(libc::SIGSYS)) => "killed by SIGSYS (a syscall outside its seccomp filter)".into(),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        (Some(code), _) => format!("exit code {code}"),
        _ => format!("{st:?}"),
    }
}

impl VmmProcess {
    /// Starts `vmm ARGS` with stdout and stderr in `dir/NAME.stdout` and `dir/NAME.stderr`.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> VmmProcess {
        let stderr = dir.join(format!("{name}.stderr"));
        let out = |p: &Path| {
            fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
        };
        let child = Command::new(vmm_binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(out(&dir.join(format!("{name}.stdout"))))
            .stderr(out(&stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn vmm {args:?}: {e}"));
        VmmProcess {
            child,
            name: name.to_string(),
            stderr,
            started: Instant::now(),
        }
    }

    /// `vmm run` of the test guest kernel with `mem_mib` MiB and `extra` arguments, its console
    /// in `dir/NAME.serial` and its API on `dir/NAME.sock`; waits for the API socket. Returns
    /// the process, the socket and the console file.
    pub fn boot_kernel(
        dir: &Path,
        name: &str,
        mem_mib: &str,
        extra: &[&str],
        api_wait: Duration,
    ) -> (VmmProcess, PathBuf, PathBuf) {
        let kernel = &crate::artifacts::artifacts().kernel;
        let (sock, serial) = (
            dir.join(format!("{name}.sock")),
            dir.join(format!("{name}.serial")),
        );
        let mut args = vec![
            "run",
            "--kernel",
            utf8(kernel),
            "--mem-mib",
            mem_mib,
            "--serial-log",
            utf8(&serial),
            "--api-sock",
            utf8(&sock),
        ];
        args.extend_from_slice(extra);
        let mut vm = VmmProcess::spawn(dir, name, &args);
        vm.wait_api(&sock, api_wait);
        (vm, sock, serial)
    }

    /// `vmm run --restore SNAP --paused` with its API on `sock` and its console in
    /// `dir/NAME.serial`; waits for the API socket.
    pub fn restore_paused(
        dir: &Path,
        name: &str,
        snap: &Path,
        sock: &Path,
        api_wait: Duration,
    ) -> VmmProcess {
        let serial = dir.join(format!("{name}.serial"));
        let mut vm = VmmProcess::spawn(
            dir,
            name,
            &[
                "run",
                "--restore",
                utf8(snap),
                "--paused",
                "--api-sock",
                utf8(sock),
                "--serial-log",
                utf8(&serial),
            ],
        );
        vm.wait_api(sock, api_wait);
        vm
    }

    /// The name given at spawn (names its files and messages).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was spawned.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its exit status if it has ended.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on the vmm child")
    }

    /// True while it runs.
    pub fn alive(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Panics (with how it ended and its stderr) if it has ended; `when` says what the test was
    /// doing.
    pub fn assert_alive(&mut self, when: &str) {
        if let Some(st) = self.try_wait() {
            panic!(
                "vmm {} ended {when}: {}; stderr:\n{}",
                self.name,
                describe_exit(st),
                self.stderr()
            );
        }
    }

    /// Waits up to `timeout` for it to end.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGKILL (the exit is collected by [`VmmProcess::wait`] or on drop).
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the vmm child");
    }

    /// Waits until `sock` accepts connections; panics if the VMM ends first or after `within`.
    pub fn wait_api(&mut self, sock: &Path, within: Duration) {
        let deadline = Instant::now() + within;
        while UnixStream::connect(sock).is_err() {
            self.assert_alive("before its API socket accepted connections");
            assert!(
                Instant::now() < deadline,
                "vmm {}: no API socket {} after {within:?}",
                self.name,
                sock.display()
            );
            std::thread::sleep(POLL);
        }
    }

    /// `PUT /actions Stop`; the VMM must then exit 0 within `within` (never of SIGSYS).
    pub fn stop(&mut self, sock: &Path, within: Duration) {
        self.assert_alive("before Stop");
        let (code, body) = api(sock, "PUT", "/actions", Some(r#"{"action_type":"Stop"}"#));
        assert_eq!(code, 204, "vmm {}: Stop: {body}", self.name);
        let st = self.wait(within).unwrap_or_else(|| {
            panic!(
                "vmm {} still runs {within:?} after Stop: {}",
                self.name,
                self.stderr()
            )
        });
        assert_ne!(
            st.signal(),
            Some(libc::SIGSYS),
            "vmm {} was killed by seccomp; stderr:\n{}",
            self.name,
            self.stderr()
        );
        assert_eq!(
            st.code(),
            Some(0),
            "vmm {} after Stop: {}; stderr:\n{}",
            self.name,
            describe_exit(st),
            self.stderr()
        );
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
