use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::tables::*;
use super::*;

#[test]
fn every_filter_compiles_for_x86_64() {
    for kind in ThreadKind::ALL {
        let programs =
            compile_for(kind, TargetArch::x86_64).unwrap_or_else(|e| panic!("{kind} filter: {e}"));
        let expected = 1
            + usize::from(!kind.fail_list().is_empty())
            + usize::from(!kind.kill_list().is_empty());
        assert_eq!(programs.len(), expected, "{kind}");
        // The kernel takes at most 4096 instructions.
        for program in &programs {
            assert!(
                !program.is_empty() && program.len() <= 4096,
                "{kind}: {} BPF instructions",
                program.len()
            );
        }
        println!(
            "{kind}: {} syscalls allowed, {} failing with EACCES; BPF instructions {:?}",
            syscalls(kind).len(),
            kind.fail_list().len(),
            programs.iter().map(Vec::len).collect::<Vec<_>>()
        );
    }
}

#[test]
fn ioctl_numbers_match_the_kernel_headers() {
    // Values as the kernel defines them (strace -X raw of this VMM, and
    // linux/kvm.h, linux/userfaultfd.h).
    let expected = [
        (KVM_CREATE_VM, 0xae01),
        (KVM_GET_MSR_INDEX_LIST, 0xc004_ae02),
        (KVM_CREATE_VCPU, 0xae41),
        (KVM_GET_DIRTY_LOG, 0x4010_ae42),
        (KVM_SET_USER_MEMORY_REGION, 0x4020_ae46),
        (KVM_GET_IRQCHIP, 0xc208_ae62),
        (KVM_SET_IRQCHIP, 0x8208_ae63),
        (KVM_IRQFD, 0x4020_ae76),
        (KVM_CREATE_PIT2, 0x4040_ae77),
        (KVM_IOEVENTFD, 0x4040_ae79),
        (KVM_SET_CLOCK, 0x4030_ae7b),
        (KVM_GET_CLOCK, 0x8030_ae7c),
        (KVM_GET_PIT2, 0x8070_ae9f),
        (KVM_SET_PIT2, 0x4070_aea0),
        (KVM_RUN, 0xae80),
        (KVM_GET_REGS, 0x8090_ae81),
        (KVM_SET_REGS, 0x4090_ae82),
        (KVM_GET_SREGS, 0x8138_ae83),
        (KVM_SET_SREGS, 0x4138_ae84),
        (KVM_GET_MSRS, 0xc008_ae88),
        (KVM_SET_MSRS, 0x4008_ae89),
        (KVM_GET_LAPIC, 0x8400_ae8e),
        (KVM_SET_LAPIC, 0x4400_ae8f),
        (KVM_SET_CPUID2, 0x4008_ae90),
        (KVM_GET_CPUID2, 0xc008_ae91),
        (KVM_GET_MP_STATE, 0x8004_ae98),
        (KVM_SET_MP_STATE, 0x4004_ae99),
        (KVM_GET_VCPU_EVENTS, 0x8040_ae9f),
        (KVM_SET_VCPU_EVENTS, 0x4040_aea0),
        (KVM_GET_DEBUGREGS, 0x8080_aea1),
        (KVM_SET_DEBUGREGS, 0x4080_aea2),
        (KVM_GET_TSC_KHZ, 0xaea3),
        (KVM_GET_XSAVE, 0x9000_aea4),
        (KVM_SET_XSAVE, 0x5000_aea5),
        (KVM_GET_XCRS, 0x8188_aea6),
        (KVM_SET_XCRS, 0x4188_aea7),
        (KVM_KVMCLOCK_CTRL, 0xaead),
        (USERFAULTFD_IOC_NEW, 0xaa00),
        (UFFDIO_REGISTER, 0xc020_aa00),
        (UFFDIO_UNREGISTER, 0x8010_aa01),
        (UFFDIO_WAKE, 0x8010_aa02),
        (UFFDIO_COPY, 0xc028_aa03),
        (UFFDIO_ZEROPAGE, 0xc020_aa04),
        (UFFDIO_WRITEPROTECT, 0xc018_aa06),
        (UFFDIO_API, 0xc018_aa3f),
    ];
    for (i, (got, want)) in expected.iter().enumerate() {
        assert_eq!(got, want, "entry {i}: {got:#x} != {want:#x}");
    }
}

/// Syscall numbers of `kind`'s list with whether each is unconditional.
fn syscalls(kind: ThreadKind) -> BTreeMap<&'static str, Vec<&'static Allow>> {
    let mut map: BTreeMap<&'static str, Vec<&'static Allow>> = BTreeMap::new();
    for a in kind.allow_list() {
        map.entry(a.name()).or_default().push(a);
    }
    map
}

#[test]
fn no_unconditional_entry_hides_a_restricted_one() {
    // An `Any` entry would silently lift the argument checks of another
    // entry for the same syscall.
    for kind in ThreadKind::ALL {
        for (name, entries) in syscalls(kind) {
            let any = entries.iter().any(|a| matches!(a.args, Args::Any));
            assert!(
                !any || entries.len() == 1,
                "{kind}: {name} is listed {} times, once without conditions",
                entries.len()
            );
        }
    }
}

#[test]
fn the_vmm_list_covers_the_vcpu_list() {
    // vCPU threads started by an API restore run under both filters.
    let vmm = kind_rules(ThreadKind::Vmm);
    for (nr, rules) in kind_rules(ThreadKind::Vcpu) {
        let outer = vmm
            .get(&nr)
            .unwrap_or_else(|| panic!("syscall {nr} of the vCPU list is not in the VMM list"));
        for r in &rules {
            assert!(
                outer.is_empty() || outer.contains(r),
                "syscall {nr}: vCPU rule {r:?} is not allowed by the VMM filter"
            );
        }
    }
}

/// (syscall, rendered rules) per kind, merged as `compile` does.
fn kind_rules(kind: ThreadKind) -> BTreeMap<i64, BTreeSet<String>> {
    let mut map: BTreeMap<i64, BTreeSet<String>> = BTreeMap::new();
    for a in kind.allow_list() {
        let e = map.entry(a.nr).or_default();
        match a.args {
            Args::Any => e.insert("any".into()),
            Args::OneOf(arg, values) => {
                for v in values {
                    e.insert(format!("arg{arg}=={v:#x}"));
                }
                true
            }
            Args::AllOf(pairs) => e.insert(format!("{pairs:?}")),
            Args::NoBits(arg, mask) => e.insert(format!("arg{arg}&{mask:#x}==0")),
        };
    }
    // "any" alone means unconditional (the test above keeps it alone).
    for rules in map.values_mut() {
        if rules.contains("any") {
            rules.clear();
        }
    }
    map
}

#[test]
fn dangerous_syscalls_are_never_allowed() {
    let never = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_clone,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_mount,
        libc::SYS_setuid,
        libc::SYS_chmod,
        libc::SYS_bpf,
        libc::SYS_memfd_create,
    ];
    for kind in ThreadKind::ALL {
        for a in kind.allow_list() {
            assert!(!never.contains(&a.nr), "{kind} allows {}", a.name());
        }
    }
    // Neither a vCPU nor the API thread opens files, makes sockets, starts
    // threads or ends the process.
    let vmm_only = [
        libc::SYS_openat,
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_clone3,
        libc::SYS_exit_group,
        libc::SYS_rename,
        libc::SYS_unlink,
    ];
    for kind in [ThreadKind::Vcpu, ThreadKind::Api] {
        for a in kind.allow_list() {
            assert!(!vmm_only.contains(&a.nr), "{kind} allows {}", a.name());
        }
    }
    // Only the VMM thread may add a filter (for the vCPU threads it starts),
    // and only as a stacked filter: no SECCOMP_SET_MODE_STRICT, no flags such
    // as TSYNC or NEW_LISTENER.
    for kind in ThreadKind::ALL {
        for a in kind.allow_list() {
            if a.nr == libc::SYS_seccomp {
                assert_eq!(kind, ThreadKind::Vmm);
                assert!(matches!(
                    a.args,
                    Args::AllOf(&[(0, m), (1, 0)]) if m == libc::SECCOMP_SET_MODE_FILTER as u64
                ));
            }
        }
    }
    // mmap/mprotect never map executable memory.
    for kind in ThreadKind::ALL {
        for a in kind.allow_list() {
            if a.nr == libc::SYS_mmap || a.nr == libc::SYS_mprotect {
                assert!(
                    matches!(a.args, Args::NoBits(2, m) if m & libc::PROT_EXEC as u64 != 0),
                    "{kind}: {} may map executable memory",
                    a.name()
                );
            }
        }
    }
}

#[test]
fn seccomp_is_on_by_default() {
    assert!(enabled());
}

// ---------------------------------------------------------------------------
// In a child process: a filtered thread makes one syscall
// ---------------------------------------------------------------------------

/// Selects the case [`child_process`] runs when this test binary is
/// re-executed as a child.
const CHILD_ENV: &str = "VMM_SECCOMP_TEST_CHILD";
const CHILD_TEST: &str = "seccomp::tests::child_process";

/// The cases: thread kind, what the filtered thread does.
fn child_case(name: &str) -> Option<(ThreadKind, fn())> {
    fn forbidden_socket() {
        // SAFETY: plain syscall; an fd that might come back is leaked.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    }
    fn forbidden_execve() {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        // SAFETY: NUL-terminated path and NULL-terminated arrays that live
        // for the call; the process is replaced only if seccomp fails.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    }
    fn forbidden_ioctl() {
        // SAFETY: ioctl on an invalid fd only returns EBADF if allowed.
        unsafe { libc::ioctl(-1, KVM_CREATE_VM as libc::c_ulong, 0) };
    }
    fn forbidden_exec_mapping() {
        // SAFETY: a fresh anonymous mapping, unmapped at once if allowed.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != libc::MAP_FAILED {
                libc::munmap(p, 4096);
            }
        }
    }
    fn failing_open() {
        let err = std::fs::File::open("/etc/hostname").expect_err("open must fail");
        assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    }
    fn allowed_heap_trim() {
        // Fill this thread's malloc arena with blocks below the mmap
        // threshold, then free them all: glibc trims the heap and, the first
        // time, reads /proc/sys/vm/overcommit_memory (which must fail, not
        // kill). Seen in the real VMM after a 200 kB API request.
        let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 60 << 10]).collect();
        assert_eq!(blocks.len(), 256);
        drop(blocks);
        let again: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 60 << 10]).collect();
        drop(again);
    }
    fn allowed_vcpu_work() {
        // A vCPU ioctl (EBADF here), a console write, an allocation large
        // enough for mmap, a channel round trip, then the thread's exit.
        // SAFETY: ioctl on an invalid fd returns EBADF.
        let r = unsafe { libc::ioctl(-1, KVM_RUN as libc::c_ulong, 0) };
        assert_eq!(r, -1);
        eprintln!("seccomp-child: vcpu work");
        let big = vec![1u8; 8 << 20];
        assert_eq!(big.iter().map(|&b| usize::from(b)).sum::<usize>(), 8 << 20);
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(1).unwrap();
        assert_eq!(rx.recv().unwrap(), 1);
    }
    fn allowed_interrupted_wait() {
        // Stopped and continued while in a timed wait (the parent sends
        // SIGSTOP, SIGCONT): the kernel resumes it with restart_syscall.
        // SAFETY: poll on no descriptors only sleeps.
        let r = unsafe { libc::poll(std::ptr::null_mut(), 0, 1000) };
        assert_eq!(r, 0);
    }
    fn allowed_vmm_spawns_vcpu() {
        // An API restore: the VMM thread starts a vCPU thread, which stacks
        // the vCPU filter on the inherited one and works under both.
        let t = std::thread::Builder::new()
            .name("vcpu".into())
            .spawn(|| {
                install_filter(ThreadKind::Vcpu).expect("stack the vCPU filter");
                allowed_vcpu_work();
            })
            .unwrap();
        t.join().unwrap();
    }
    fn failing_scheduler_socket() {
        // SAFETY: plain syscall; it must fail.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        let err = std::io::Error::last_os_error();
        assert_eq!((fd, err.raw_os_error()), (-1, Some(libc::EPERM)), "{err}");
    }
    fn allowed_scheduler_store_work() {
        // What a scheduled snapshot does to the store: a directory, an
        // atomic metadata write, a flock, a copy (reflink attempt, then
        // positioned writes), a listing, a removal, a sleep, local time.
        use std::io::Write;
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("seccomp-sched-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("snap")).unwrap();
        let mut tmp = std::fs::File::create(dir.join(".meta.tmp")).unwrap();
        tmp.write_all(b"{}").unwrap();
        tmp.sync_all().unwrap();
        std::fs::rename(dir.join(".meta.tmp"), dir.join("meta.json")).unwrap();
        assert_eq!(std::fs::read(dir.join("meta.json")).unwrap(), b"{}");
        let lock = std::fs::File::create(dir.join("lock")).unwrap();
        // SAFETY: flock on a descriptor we own.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        assert_eq!(locked, 0);
        let src = std::fs::File::open(dir.join("meta.json")).unwrap();
        let dst = std::fs::File::create(dir.join("snap/disk")).unwrap();
        // SAFETY: FICLONE with two open descriptors; failing is fine.
        let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as libc::c_ulong, src.as_raw_fd()) };
        let err = std::io::Error::last_os_error();
        assert!(rc == 0 || err.raw_os_error() != Some(libc::EPERM), "{err}");
        dst.set_len(4096).unwrap();
        dst.write_all_at(b"data", 512).unwrap();
        dst.sync_all().unwrap();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let t: libc::time_t = 0;
        // SAFETY: an all-zero tm is valid; both pointers live for the call.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert!(!unsafe { libc::localtime_r(&t, &mut tm) }.is_null());
        assert!(std::fs::read_to_string("/proc/self/stat").is_ok());
    }
    fn allowed_vmm_spawn() {
        // The VMM thread starts a worker (as the page server is started)
        // which inherits the filter; both run and the worker is joined.
        let t = std::thread::Builder::new()
            .name("worker".into())
            .spawn(|| {
                let _ = std::fs::File::open("/proc/self/pagemap");
            })
            .unwrap();
        t.join().unwrap();
    }
    Some(match name {
        "vcpu-socket" => (ThreadKind::Vcpu, forbidden_socket),
        "vcpu-execve" => (ThreadKind::Vcpu, forbidden_execve),
        "vcpu-ioctl" => (ThreadKind::Vcpu, forbidden_ioctl),
        "vcpu-exec-mapping" => (ThreadKind::Vcpu, forbidden_exec_mapping),
        "vcpu-allowed" => (ThreadKind::Vcpu, allowed_vcpu_work),
        "api-socket" => (ThreadKind::Api, forbidden_socket),
        "api-open-fails" => (ThreadKind::Api, failing_open),
        "vcpu-open-fails" => (ThreadKind::Vcpu, failing_open),
        "api-heap-trim" => (ThreadKind::Api, allowed_heap_trim),
        "vcpu-heap-trim" => (ThreadKind::Vcpu, allowed_heap_trim),
        "api-stopped-and-continued" => (ThreadKind::Api, allowed_interrupted_wait),
        "vmm-execve" => (ThreadKind::Vmm, forbidden_execve),
        "scheduler-execve" => (ThreadKind::Scheduler, forbidden_execve),
        "scheduler-socket-fails" => (ThreadKind::Scheduler, failing_scheduler_socket),
        "scheduler-store-work" => (ThreadKind::Scheduler, allowed_scheduler_store_work),
        "vmm-socket" => (ThreadKind::Vmm, forbidden_socket),
        "vmm-allowed" => (ThreadKind::Vmm, allowed_vmm_spawn),
        "vmm-spawns-vcpu" => (ThreadKind::Vmm, allowed_vmm_spawns_vcpu),
        _ => return None,
    })
}

/// Not a test of its own: the body of the child process. Without the
/// environment variable (a normal test run) it does nothing.
#[test]
fn child_process() {
    let Ok(name) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (kind, action) = child_case(&name).expect("known child case");
    let thread = std::thread::Builder::new()
        .name(format!("filtered-{kind}"))
        .spawn(move || {
            install_filter(kind).expect("install the filter");
            println!("seccomp-child: calling {name}");
            action();
            println!("seccomp-child: survived {name}");
        })
        .expect("spawn the filtered thread");
    thread.join().expect("the filtered thread");
}

/// Runs one child case; returns its exit status and stdout. `once_calling`
/// runs (with the child's pid) when the filtered thread is about to act.
fn run_child_with(
    case: &str,
    once_calling: impl FnOnce(i32),
) -> (std::process::ExitStatus, String) {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, case)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child test process");
    let stdout = child.stdout.take().expect("the child's stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let pid = i32::try_from(child.id()).expect("pid");
    let marker = format!("seccomp-child: calling {case}");
    let mut once_calling = Some(once_calling);
    let mut out = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            // libtest may have printed "test ... " on the same line.
            if line.ends_with(&marker) {
                if let Some(f) = once_calling.take() {
                    f(pid);
                }
            }
            out.push_str(&line);
            out.push('\n');
        }
        if let Some(status) = child.try_wait().expect("wait for the child") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child case {case} hung:\n{out}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    reader.join().expect("stdout reader");
    out.extend(rx.try_iter().map(|l| l + "\n"));
    (status, out)
}

fn run_child(case: &str) -> (std::process::ExitStatus, String) {
    run_child_with(case, |_| {})
}

fn assert_killed(case: &str) {
    let (status, out) = run_child(case);
    assert!(
        out.contains(&format!("seccomp-child: calling {case}")),
        "{case}: the child did not reach the syscall ({status:?}):\n{out}"
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGSYS),
        "{case}: the whole process must die of SIGSYS, got {status:?}:\n{out}"
    );
}

fn assert_survives(case: &str) {
    let (status, out) = run_child(case);
    assert!(
        out.contains(&format!("seccomp-child: survived {case}")),
        "{case}: {status:?}:\n{out}"
    );
    assert_eq!(status.code(), Some(0), "{case}: {status:?}:\n{out}");
}

#[test]
fn a_forbidden_syscall_on_a_vcpu_thread_kills_the_process() {
    for case in [
        "vcpu-socket",
        "vcpu-execve",
        "vcpu-ioctl",
        "vcpu-exec-mapping",
    ] {
        assert_killed(case);
    }
}

#[test]
fn allowed_syscalls_on_a_vcpu_thread_pass() {
    assert_survives("vcpu-allowed");
}

#[test]
fn forbidden_syscalls_on_the_api_and_vmm_threads_kill_the_process() {
    for case in ["api-socket", "vmm-execve", "vmm-socket"] {
        assert_killed(case);
    }
}

#[test]
fn threads_spawned_by_the_vmm_thread_run_under_its_filter() {
    assert_survives("vmm-allowed");
    assert_survives("vmm-spawns-vcpu");
}

#[test]
fn a_thread_stopped_and_continued_in_a_timed_wait_survives() {
    let case = "api-stopped-and-continued";
    let (status, out) = run_child_with(case, |pid| {
        std::thread::sleep(Duration::from_millis(150));
        // SAFETY: signals to our own child process.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(100));
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    });
    assert!(
        out.contains(&format!("seccomp-child: survived {case}")),
        "{case}: {status:?}:\n{out}"
    );
    assert_eq!(status.code(), Some(0), "{case}: {status:?}:\n{out}");
}

#[test]
fn opening_files_fails_on_vcpu_and_api_threads_without_killing() {
    for case in ["vcpu-open-fails", "api-open-fails"] {
        assert_survives(case);
    }
}

#[test]
fn glibc_trimming_a_thread_heap_does_not_kill_the_process() {
    for case in ["api-heap-trim", "vcpu-heap-trim"] {
        assert_survives(case);
    }
}

#[test]
fn the_scheduler_thread_fails_unlisted_syscalls_but_dies_on_exec() {
    assert_killed("scheduler-execve");
    assert_survives("scheduler-socket-fails");
    assert_survives("scheduler-store-work");
}
