//! Boot: `vmm run` boots a real Linux guest to user space (nested test host,
//! 1 and 2 vCPUs), boots as far as this machine's KVM allows directly, ends
//! with a clear non-zero exit when the guest crashes, and refuses bad input
//! with one clear line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vmm_tests::*;

/// Runs `vmm` with `args`, returning (exit code, stdout, stderr).
fn vmm(args: &[&str], timeout: Duration) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(vmm_binary());
    cmd.args(args);
    let out = run_with_timeout(&mut cmd, timeout);
    assert!(!out.timed_out, "vmm {args:?} timed out after {timeout:?}");
    (
        out.output.status.code(),
        String::from_utf8_lossy(&out.output.stdout).into_owned(),
        String::from_utf8_lossy(&out.output.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let dir = scratch_dir().join(format!("boot-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A minimal ELF64 "kernel" whose entry point is `ud2`: with the boot IDT
/// empty the exception cannot be delivered and the vCPU triple-faults (or,
/// on kvm_pvm, its emulator reports an internal error).
fn crashing_kernel(dir: &Path) -> PathBuf {
    const LOAD: u64 = 0x100_0000;
    let code = [0x0f, 0x0b, 0xeb, 0xfc]; // ud2; jmp back to it
    let mut elf = Vec::new();
    // ELF header.
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // entry
    elf.extend_from_slice(&64u64.to_le_bytes()); // phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // shoff
    elf.extend_from_slice(&0u32.to_le_bytes()); // flags
    elf.extend_from_slice(&64u16.to_le_bytes()); // ehsize
    elf.extend_from_slice(&56u16.to_le_bytes()); // phentsize
    elf.extend_from_slice(&1u16.to_le_bytes()); // phnum
    elf.extend_from_slice(&[0; 6]); // shentsize, shnum, shstrndx
                                    // One PT_LOAD program header.
    let offset = 64 + 56;
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&(offset as u64).to_le_bytes());
    elf.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    elf.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    let path = dir.join("crash.elf");
    std::fs::write(&path, elf).expect("write crash kernel");
    path
}

#[test]
fn nested_guest_reaches_user_space_with_1_and_2_vcpus() {
    let script = format!(
        r#"
for n in 1 2; do
  cp /guest/rootfs.ext4 /tmp/rootfs$n.ext4
  t0=$(cut -d' ' -f1 /proc/uptime)
  timeout 120 /usr/bin/vmm run --kernel /guest/vmlinux --rootfs /tmp/rootfs$n.ext4 --vcpus $n --mem-mib 256 \
      --cmdline "{GUEST_CMDLINE} vmm.boot_test=1" --serial-log /tmp/g$n.log 2>/tmp/err$n
  echo "BOOT_EXIT_$n=$?"
  t1=$(cut -d' ' -f1 /proc/uptime)
  echo "BOOT_WALL_$n=$(awk -v a=$t0 -v b=$t1 'BEGIN{{print b-a}}')"
  echo "BOOT_USERSPACE_$n=$(grep -c VMM-GUEST-USERSPACE-OK /tmp/g$n.log)"
  echo "BOOT_CPUS_$n=$(grep -o 'VMM-GUEST-USERSPACE-OK cpus=[0-9]*' /tmp/g$n.log | cut -d= -f2)"
  echo "BOOT_STDERR_$n=$(head -c 200 /tmp/err$n | tr '\n' ' ')"
done
"#
    );
    let run = run_nested(
        &script,
        NestedOptions::new("boot-userspace").timeout(Duration::from_secs(300)),
    );
    run.assert_success();
    for n in ["1", "2"] {
        run.assert_marker(&format!("BOOT_EXIT_{n}"), "0");
        run.assert_marker(&format!("BOOT_USERSPACE_{n}"), "1");
        run.assert_marker(&format!("BOOT_CPUS_{n}"), n);
        run.assert_marker(&format!("BOOT_STDERR_{n}"), "");
        let wall = run.marker(&format!("BOOT_WALL_{n}")).unwrap_or_default();
        println!(
            "nested (not a performance figure): {n} vCPU boot to user space and reboot: {wall} s"
        );
    }
}

#[test]
fn nested_guest_panic_ends_the_vmm_with_exit_code_2() {
    let script = r#"
timeout 120 /usr/bin/vmm run --kernel /guest/vmlinux --mem-mib 128 \
    --cmdline "console=ttyS0 reboot=k panic=1 quiet root=/dev/vdz" --serial-log /tmp/g.log 2>/tmp/err
echo "PANIC_EXIT=$?"
echo "PANIC_STDERR=$(tr '\n' ' ' </tmp/err)"
"#;
    let run = run_nested(
        script,
        NestedOptions::new("boot-panic").timeout(Duration::from_secs(180)),
    );
    run.assert_success();
    run.assert_marker("PANIC_EXIT", "2");
    let err = run.marker("PANIC_STDERR").unwrap_or_default();
    assert!(
        err.contains(
            "guest kernel panicked: Kernel panic - not syncing: VFS: Unable to mount root fs"
        ),
        "stderr: {err}\n{}",
        run.tail(30)
    );
}

#[test]
fn guest_crash_reports_vcpu_exit_and_rip() {
    if !require_kvm() {
        return;
    }
    let dir = scratch("crash");
    let kernel = crashing_kernel(&dir);
    let (code, _, err) = vmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem-mib",
            "32",
            "--serial-log",
            dir.join("serial.log").to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(2), "stderr: {err}");
    assert!(err.starts_with("vmm: vCPU 0: "), "stderr: {err}");
    assert!(
        err.contains("KVM_EXIT_SHUTDOWN") || err.contains("KVM_EXIT_INTERNAL_ERROR"),
        "stderr: {err}"
    );
    // The RIP is the ud2 at the entry point, or inside the failed delivery.
    assert!(err.contains("RIP 0x"), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
}

#[test]
fn direct_kvm_boot_goes_as_far_as_the_host_allows() {
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let dir = scratch("direct");
    let rootfs = dir.join("rootfs.ext4");
    std::fs::copy(&a.rootfs, &rootfs).expect("copy rootfs");
    let log = dir.join("serial.log");
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    let started = std::time::Instant::now();
    let (code, _, err) = vmm(
        &[
            "run",
            "--kernel",
            a.kernel.to_str().unwrap(),
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--mem-mib",
            "256",
            "--vcpus",
            "1",
            "--serial-log",
            log.to_str().unwrap(),
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 vmm.boot_test=1",
        ],
        Duration::from_secs(300),
    );
    let serial = std::fs::read_to_string(&log).unwrap_or_default();
    println!("direct boot took {:?} wall", started.elapsed());
    assert!(
        serial.contains("EXT4-fs (vda): mounted filesystem"),
        "root not mounted from virtio-blk:\n{}",
        tail(&serial, 30)
    );
    assert!(
        serial.contains("Run /sbin/init as init process"),
        "init not reached:\n{}",
        tail(&serial, 30)
    );
    if pvm {
        // kvm_pvm: guest user space cannot make system calls, so init dies
        // on its first one and the kernel panics; the VMM must say so.
        assert_eq!(code, Some(2), "stderr: {err}");
        assert!(
            err.contains(
                "guest kernel panicked: Kernel panic - not syncing: Attempted to kill init!"
            ),
            "stderr: {err}"
        );
    } else {
        assert_eq!(code, Some(0), "stderr: {err}");
        assert!(
            serial.contains("VMM-GUEST-USERSPACE-OK"),
            "{}",
            tail(&serial, 30)
        );
    }
}

#[test]
fn bad_input_gets_one_clear_error_line() {
    if !require_kvm() {
        return;
    }
    let a = artifacts();
    let kernel = a.kernel.to_str().unwrap();
    let dir = scratch("badinput");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    let cfg = dir.join("vm.json");
    std::fs::write(&cfg, format!(r#"{{"kernel": "{kernel}", "vcpu": 2}}"#)).unwrap();
    let long = "x".repeat(3000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["run"], "nothing to run"),
        (
            vec!["run", "--kernel", "/nonexistent/vmlinux"],
            "kernel /nonexistent/vmlinux: No such file",
        ),
        (
            vec!["run", "--kernel", kernel, "--vcpus", "0"],
            "vcpus must be between 1 and",
        ),
        (
            vec!["run", "--kernel", kernel, "--mem-mib", "1"],
            "mem_mib must be between 16 and",
        ),
        (
            vec!["run", "--kernel", junk.to_str().unwrap()],
            "cannot load kernel",
        ),
        (
            vec![
                "run",
                "--kernel",
                kernel,
                "--drive",
                "path=/nonexistent.img",
            ],
            "drive /nonexistent.img",
        ),
        (
            vec![
                "run",
                "--kernel",
                kernel,
                "--vsock",
                "cid=1,uds=/tmp/x.sock",
            ],
            "guest_cid must be between 3",
        ),
        (
            vec!["run", "--kernel", kernel, "--cmdline", &long],
            "command line is",
        ),
        (
            vec!["run", "--config", cfg.to_str().unwrap()],
            "unknown field `vcpu`",
        ),
        (
            vec!["run", "--restore", "/nonexistent/snap"],
            "cannot restore /nonexistent/snap",
        ),
    ];
    for (args, expected) in cases {
        let (code, _, err) = vmm(&args, Duration::from_secs(30));
        assert_eq!(code, Some(1), "vmm {args:?}: stderr: {err}");
        assert!(
            err.contains(expected),
            "vmm {args:?}: expected {expected:?} in: {err}"
        );
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "vmm {args:?}: one line please: {err}"
        );
    }
    // clap's own usage errors also exit non-zero.
    let (code, _, err) = vmm(&["run", "--drive", "size=3"], Duration::from_secs(10));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown key `size`"), "{err}");
}
