//! The allow-lists, as data: one list of groups per thread kind, each group
//! commented with why its syscalls are needed. Derived from `strace -f -ff
//! -X raw` of the real workloads (see the parent module) plus the code paths
//! traces cannot reach (errors, devices a parked guest never drives).

use std::mem::size_of;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_ioeventfd, kvm_irqchip,
    kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs, kvm_pit_config,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};

/// One allowed syscall and the arguments it may take.
#[derive(Debug)]
pub struct Allow {
    /// The syscall number.
    pub nr: i64,
    /// `SYS_<name>`, for listings and test messages.
    pub label: &'static str,
    pub args: Args,
}

impl Allow {
    /// The syscall's name.
    pub fn name(&self) -> &'static str {
        self.label.trim_start_matches("SYS_")
    }
}

/// Which arguments an allowed syscall may take. Values are compared on the
/// low 32 bits of the argument (ioctl requests, commands and flags all fit).
#[derive(Debug)]
pub enum Args {
    /// Any arguments.
    Any,
    /// Argument `.0` equals one of `.1`.
    OneOf(u8, &'static [u64]),
    /// Every (argument, value) pair holds at once.
    AllOf(&'static [(u8, u64)]),
    /// Argument `.0` has none of the bits of `.1` set.
    NoBits(u8, u64),
}

macro_rules! allow {
    ($nr:ident) => {
        Allow {
            nr: libc::$nr,
            label: stringify!($nr),
            args: Args::Any,
        }
    };
    ($nr:ident, arg $i:literal in $values:expr) => {
        Allow {
            nr: libc::$nr,
            label: stringify!($nr),
            args: Args::OneOf($i, $values),
        }
    };
    ($nr:ident, args = $pairs:expr) => {
        Allow {
            nr: libc::$nr,
            label: stringify!($nr),
            args: Args::AllOf($pairs),
        }
    };
    ($nr:ident, arg $i:literal without $mask:expr) => {
        Allow {
            nr: libc::$nr,
            label: stringify!($nr),
            args: Args::NoBits($i, $mask),
        }
    };
}

// ---------------------------------------------------------------------------
// ioctl request numbers (asm-generic/ioctl.h encoding: dir, size, type, nr)
// ---------------------------------------------------------------------------

const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const fn io(ty: u64, nr: u64) -> u64 {
    ioc(0, ty, nr, 0)
}
const fn iow(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(1, ty, nr, size)
}
const fn ior(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(2, ty, nr, size)
}
const fn iowr(ty: u64, nr: u64, size: usize) -> u64 {
    ioc(3, ty, nr, size)
}

const KVMIO: u64 = 0xAE;
/// userfaultfd's ioctl type (linux/userfaultfd.h).
const UFFDIO: u64 = 0xAA;

// /dev/kvm
pub(super) const KVM_CREATE_VM: u64 = io(KVMIO, 0x01);
pub(super) const KVM_GET_MSR_INDEX_LIST: u64 = iowr(KVMIO, 0x02, size_of::<kvm_msr_list>());
pub(super) const KVM_CHECK_EXTENSION: u64 = io(KVMIO, 0x03);
pub(super) const KVM_GET_VCPU_MMAP_SIZE: u64 = io(KVMIO, 0x04);
// VM fd
pub(super) const KVM_CREATE_VCPU: u64 = io(KVMIO, 0x41);
pub(super) const KVM_GET_DIRTY_LOG: u64 = iow(KVMIO, 0x42, size_of::<kvm_dirty_log>());
pub(super) const KVM_SET_USER_MEMORY_REGION: u64 =
    iow(KVMIO, 0x46, size_of::<kvm_userspace_memory_region>());
pub(super) const KVM_SET_TSS_ADDR: u64 = io(KVMIO, 0x47);
pub(super) const KVM_CREATE_IRQCHIP: u64 = io(KVMIO, 0x60);
pub(super) const KVM_GET_IRQCHIP: u64 = iowr(KVMIO, 0x62, size_of::<kvm_irqchip>());
// Declared _IOR in the kernel headers, although it writes to the kernel.
pub(super) const KVM_SET_IRQCHIP: u64 = ior(KVMIO, 0x63, size_of::<kvm_irqchip>());
pub(super) const KVM_IRQFD: u64 = iow(KVMIO, 0x76, size_of::<kvm_irqfd>());
pub(super) const KVM_CREATE_PIT2: u64 = iow(KVMIO, 0x77, size_of::<kvm_pit_config>());
pub(super) const KVM_IOEVENTFD: u64 = iow(KVMIO, 0x79, size_of::<kvm_ioeventfd>());
pub(super) const KVM_SET_CLOCK: u64 = iow(KVMIO, 0x7b, size_of::<kvm_clock_data>());
pub(super) const KVM_GET_CLOCK: u64 = ior(KVMIO, 0x7c, size_of::<kvm_clock_data>());
pub(super) const KVM_GET_PIT2: u64 = ior(KVMIO, 0x9f, size_of::<kvm_pit_state2>());
pub(super) const KVM_SET_PIT2: u64 = iow(KVMIO, 0xa0, size_of::<kvm_pit_state2>());
// vCPU fd
pub(super) const KVM_RUN: u64 = io(KVMIO, 0x80);
pub(super) const KVM_GET_REGS: u64 = ior(KVMIO, 0x81, size_of::<kvm_regs>());
pub(super) const KVM_SET_REGS: u64 = iow(KVMIO, 0x82, size_of::<kvm_regs>());
pub(super) const KVM_GET_SREGS: u64 = ior(KVMIO, 0x83, size_of::<kvm_sregs>());
pub(super) const KVM_SET_SREGS: u64 = iow(KVMIO, 0x84, size_of::<kvm_sregs>());
pub(super) const KVM_GET_MSRS: u64 = iowr(KVMIO, 0x88, size_of::<kvm_msrs>());
pub(super) const KVM_SET_MSRS: u64 = iow(KVMIO, 0x89, size_of::<kvm_msrs>());
pub(super) const KVM_GET_LAPIC: u64 = ior(KVMIO, 0x8e, size_of::<kvm_lapic_state>());
pub(super) const KVM_SET_LAPIC: u64 = iow(KVMIO, 0x8f, size_of::<kvm_lapic_state>());
pub(super) const KVM_SET_CPUID2: u64 = iow(KVMIO, 0x90, size_of::<kvm_cpuid2>());
pub(super) const KVM_GET_CPUID2: u64 = iowr(KVMIO, 0x91, size_of::<kvm_cpuid2>());
pub(super) const KVM_GET_MP_STATE: u64 = ior(KVMIO, 0x98, size_of::<kvm_mp_state>());
pub(super) const KVM_SET_MP_STATE: u64 = iow(KVMIO, 0x99, size_of::<kvm_mp_state>());
pub(super) const KVM_GET_VCPU_EVENTS: u64 = ior(KVMIO, 0x9f, size_of::<kvm_vcpu_events>());
pub(super) const KVM_SET_VCPU_EVENTS: u64 = iow(KVMIO, 0xa0, size_of::<kvm_vcpu_events>());
pub(super) const KVM_GET_DEBUGREGS: u64 = ior(KVMIO, 0xa1, size_of::<kvm_debugregs>());
pub(super) const KVM_SET_DEBUGREGS: u64 = iow(KVMIO, 0xa2, size_of::<kvm_debugregs>());
pub(super) const KVM_SET_TSC_KHZ: u64 = io(KVMIO, 0xa2);
pub(super) const KVM_GET_TSC_KHZ: u64 = io(KVMIO, 0xa3);
pub(super) const KVM_GET_XSAVE: u64 = ior(KVMIO, 0xa4, size_of::<kvm_xsave>());
pub(super) const KVM_SET_XSAVE: u64 = iow(KVMIO, 0xa5, size_of::<kvm_xsave>());
pub(super) const KVM_GET_XCRS: u64 = ior(KVMIO, 0xa6, size_of::<kvm_xcrs>());
pub(super) const KVM_SET_XCRS: u64 = iow(KVMIO, 0xa7, size_of::<kvm_xcrs>());
pub(super) const KVM_KVMCLOCK_CTRL: u64 = io(KVMIO, 0xad);

// userfaultfd; struct sizes from linux/userfaultfd.h (all-u64 structs).
/// `/dev/userfaultfd`: make a userfaultfd.
pub(super) const USERFAULTFD_IOC_NEW: u64 = io(UFFDIO, 0x00);
/// `struct uffdio_register`: range (2 × u64), mode, ioctls.
pub(super) const UFFDIO_REGISTER: u64 = iowr(UFFDIO, 0x00, 32);
/// `struct uffdio_range`: start, len.
pub(super) const UFFDIO_UNREGISTER: u64 = ior(UFFDIO, 0x01, 16);
pub(super) const UFFDIO_WAKE: u64 = ior(UFFDIO, 0x02, 16);
/// `struct uffdio_copy`: dst, src, len, mode, copy.
pub(super) const UFFDIO_COPY: u64 = iowr(UFFDIO, 0x03, 40);
/// `struct uffdio_zeropage`: range, mode, zeropage.
pub(super) const UFFDIO_ZEROPAGE: u64 = iowr(UFFDIO, 0x04, 32);
/// `struct uffdio_writeprotect`: range, mode.
pub(super) const UFFDIO_WRITEPROTECT: u64 = iowr(UFFDIO, 0x06, 24);
/// `struct uffdio_api`: api, features, ioctls.
pub(super) const UFFDIO_API: u64 = iowr(UFFDIO, 0x3F, 24);

// ---------------------------------------------------------------------------
// Argument value sets
// ---------------------------------------------------------------------------

/// What a vCPU thread asks of its vCPU fd: run the guest, and save state
/// when paused (`VcpuRequest::WithFd` from a snapshot; `KVM_GET_REGS` also
/// reads the RIP of a crash).
const VCPU_IOCTLS: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_GET_MSRS,
    KVM_GET_LAPIC,
    KVM_GET_CPUID2,
    KVM_GET_MP_STATE,
    KVM_GET_VCPU_EVENTS,
    KVM_GET_DEBUGREGS,
    KVM_GET_TSC_KHZ,
    KVM_GET_XSAVE,
    KVM_GET_XCRS,
    KVM_KVMCLOCK_CTRL,
];

/// What the VMM thread asks of KVM: building a VM from a snapshot through
/// the API (create VM and vCPUs, memory slots, irqchip, PIT, irqfd and
/// ioeventfd for devices, restore VM and vCPU state), saving VM state and the
/// dirty log for snapshots. Booting from a kernel happens before the filter
/// is installed and needs nothing more than this.
const VMM_KVM_IOCTLS: &[u64] = &[
    KVM_CREATE_VM,
    KVM_GET_MSR_INDEX_LIST,
    KVM_CHECK_EXTENSION,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_CREATE_VCPU,
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_TSS_ADDR,
    KVM_CREATE_IRQCHIP,
    KVM_GET_IRQCHIP,
    KVM_SET_IRQCHIP,
    KVM_IRQFD,
    KVM_CREATE_PIT2,
    KVM_IOEVENTFD,
    KVM_SET_CLOCK,
    KVM_GET_CLOCK,
    KVM_GET_PIT2,
    KVM_SET_PIT2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    KVM_SET_MSRS,
    KVM_SET_LAPIC,
    KVM_SET_CPUID2,
    KVM_SET_MP_STATE,
    KVM_SET_VCPU_EVENTS,
    KVM_SET_DEBUGREGS,
    KVM_SET_TSC_KHZ,
    KVM_SET_XSAVE,
    KVM_SET_XCRS,
];

/// The VMM thread's other ioctls: TAP setup for a restored net device,
/// non-blocking vsock streams, the terminal check for serial input, and
/// userfaultfd for Uffd restores (page server, background fill) and live
/// snapshots (write protection).
const VMM_OTHER_IOCTLS: &[u64] = &[
    libc::TUNSETIFF,
    libc::TUNSETVNETHDRSZ,
    libc::FIONBIO,
    libc::TCGETS,
    USERFAULTFD_IOC_NEW,
    UFFDIO_API,
    UFFDIO_REGISTER,
    UFFDIO_UNREGISTER,
    UFFDIO_WAKE,
    UFFDIO_COPY,
    UFFDIO_ZEROPAGE,
    UFFDIO_WRITEPROTECT,
];

/// futex operations: Rust's locks, channels and thread parking
/// (`FUTEX_WAIT_BITSET|PRIVATE`, `FUTEX_WAKE|PRIVATE`), glibc's internal
/// locks (`FUTEX_WAIT|PRIVATE`), and `pthread_join` (shared
/// `FUTEX_WAIT_BITSET|CLOCK_REALTIME` on the thread id).
const FUTEX_OPS: &[u64] = &[
    libc::FUTEX_WAIT as u64,
    libc::FUTEX_WAKE as u64,
    libc::FUTEX_WAIT_BITSET as u64,
    (libc::FUTEX_WAIT_BITSET | libc::FUTEX_CLOCK_REALTIME) as u64,
    (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as u64,
    (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as u64,
    (libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG) as u64,
    (libc::FUTEX_WAIT_BITSET | libc::FUTEX_PRIVATE_FLAG | libc::FUTEX_CLOCK_REALTIME) as u64,
];

/// fcntl commands: `F_DUPFD_CLOEXEC` (`try_clone` of eventfds and files) and
/// `F_GETFD` (std checks a descriptor is open before closing it).
const FCNTL_CMDS: &[u64] = &[libc::F_DUPFD_CLOEXEC as u64, libc::F_GETFD as u64];

/// The only `madvise` advice used: glibc giving back a finished thread's
/// stack or trimmed heap memory.
const MADVISE_ADVICE: &[u64] = &[libc::MADV_DONTNEED as u64];

// ---------------------------------------------------------------------------
// Groups shared by every kind
// ---------------------------------------------------------------------------

/// The Rust and glibc runtime on any thread.
const RUNTIME: &[Allow] = &[
    // Locks, condition variables, channels (which yield while spinning).
    allow!(SYS_futex, arg 1 in FUTEX_OPS),
    allow!(SYS_sched_yield),
    // The allocator (glibc malloc arenas, large blocks, realloc of large
    // blocks); mappings are never executable.
    allow!(SYS_brk),
    allow!(SYS_mmap, arg 2 without libc::PROT_EXEC as u64),
    allow!(SYS_mprotect, arg 2 without libc::PROT_EXEC as u64),
    allow!(SYS_mremap),
    allow!(SYS_munmap),
    allow!(SYS_madvise, arg 2 in MADVISE_ADVICE),
    // Thread exit: glibc blocks signals and frees the stack, Rust frees the
    // alternate signal stack; and the kick/SIGTERM handlers return.
    allow!(SYS_rt_sigprocmask),
    allow!(SYS_sigaltstack),
    allow!(SYS_rt_sigreturn),
    allow!(SYS_exit),
    // The kernel resumes a timed wait (poll, futex, nanosleep) this way after
    // a stop/continue (job control, a debugger attaching) or a handler with
    // SA_RESTART.
    allow!(SYS_restart_syscall),
    // Time, when the vDSO falls back to the kernel (e.g. unstable TSC).
    allow!(SYS_clock_gettime),
    // The first HashMap of a thread seeds its hasher.
    allow!(SYS_getrandom),
    // Logging to stderr; on any thread, SIGTERM's handler writes an eventfd.
    allow!(SYS_write),
    // Dropping descriptors, cloning eventfds.
    allow!(SYS_close),
    allow!(SYS_fcntl, arg 1 in FCNTL_CMDS),
];

// ---------------------------------------------------------------------------
// vCPU threads
// ---------------------------------------------------------------------------

/// A vCPU thread, after it installs its filter and until it ends.
const VCPU: &[Allow] = &[
    // KVM_RUN and saving a paused vCPU's state. Port/MMIO emulation writes
    // the console (write), raises interrupts through irqfds (write), and on
    // virtio activation clones queue eventfds (fcntl) and wakes the event
    // loop (write); all in RUNTIME.
    allow!(SYS_ioctl, arg 1 in VCPU_IOCTLS),
    // A guest that resets its virtio devices (reboot, driver reload) does so
    // by MMIO writes on this thread; the vsock reset shuts down the host
    // ends of its connections (they are closed later on the event loop).
    allow!(SYS_shutdown),
];

pub(super) const VCPU_GROUPS: &[&[Allow]] = &[RUNTIME, VCPU];

/// Denied with `EACCES` instead of killing, on the vCPU and API threads.
/// glibc's malloc, the first time it shrinks a thread's heap, reads
/// /proc/sys/vm/overcommit_memory (and `get_nprocs` reads
/// /sys/devices/system/cpu/online when a thread needs a new arena); when the
/// open fails it falls back to safe defaults (`MADV_DONTNEED`, a guessed CPU
/// count). These threads open nothing themselves.
pub(super) const FAIL_OPEN: &[Allow] = &[allow!(SYS_openat)];

// ---------------------------------------------------------------------------
// API thread
// ---------------------------------------------------------------------------

/// The control API server: one Unix-socket connection at a time.
const API: &[Allow] = &[
    // Waiting on the listener, the connection and the stop eventfd.
    allow!(SYS_poll),
    // Connections: accept (SOCK_CLOEXEC), blocking mode (FIONBIO), a write
    // timeout (SO_SNDTIMEO), reads (recv) and writes (send, MSG_NOSIGNAL).
    allow!(SYS_accept4),
    allow!(SYS_ioctl, arg 1 in &[libc::FIONBIO]),
    allow!(
        SYS_setsockopt,
        args = &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_SNDTIMEO as u64)]
    ),
    allow!(SYS_recvfrom),
    allow!(SYS_sendto),
    // Backing off after a failed accept.
    allow!(SYS_clock_nanosleep),
];

pub(super) const API_GROUPS: &[&[Allow]] = &[RUNTIME, API];

// ---------------------------------------------------------------------------
// VMM thread (event loop) and the threads it spawns
// ---------------------------------------------------------------------------

/// The event loop, devices' I/O and API actions (snapshots, restores).
const VMM: &[Allow] = &[
    // The event loop (a restore builds a new one) and its eventfds.
    allow!(SYS_epoll_create1),
    allow!(SYS_epoll_ctl),
    allow!(SYS_epoll_wait),
    allow!(SYS_eventfd2),
    // KVM, TAP, vsock streams, terminal check, userfaultfd.
    allow!(SYS_ioctl, arg 1 in VMM_KVM_IOCTLS),
    allow!(SYS_ioctl, arg 1 in VMM_OTHER_IOCTLS),
    // Files: block device I/O (lseek + read/write, fdatasync on flush), TAP
    // frames, eventfds; snapshot state and memory files (atomic write: temp
    // file, fsync, rename, fsync of the directory; sparse memory files with
    // ftruncate, fallocate punching holes, lseek SEEK_DATA/SEEK_HOLE;
    // /proc/self/pagemap to skip unpopulated pages; diff pages gathered with
    // pwritev), restore inputs, the serial log; unlinking stale vsock sockets
    // and temporary files.
    allow!(SYS_openat),
    allow!(SYS_read),
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_pwritev),
    allow!(SYS_lseek),
    allow!(SYS_fsync),
    allow!(SYS_fdatasync),
    allow!(SYS_ftruncate),
    allow!(SYS_fallocate),
    allow!(SYS_statx),
    allow!(SYS_rename),
    allow!(SYS_unlink),
    // vsock host side (Unix sockets only): the listener of a restored
    // device, host-initiated connections (accept, shutdown) and
    // guest-initiated ones (connect to `<uds>_<port>`); std's UnixStream
    // reads with recvfrom and writes with sendto (MSG_NOSIGNAL).
    allow!(SYS_socket, arg 0 in &[libc::AF_UNIX as u64]),
    allow!(SYS_bind),
    allow!(SYS_listen),
    allow!(SYS_accept4),
    allow!(SYS_connect),
    allow!(SYS_recvfrom),
    allow!(SYS_sendto),
    // shutdown: in the vCPU list, which this one includes.
    // Uffd restores without /dev/userfaultfd use the syscall.
    allow!(SYS_userfaultfd),
    // Threads: vCPUs of a restored VM, page server, page fill, live copy.
    allow!(SYS_clone3),
    // A restored VM installs its SIGTERM/SIGINT handlers and, first time,
    // the vCPU kick handler; kicks are pthread_kill (getpid + tgkill).
    allow!(SYS_rt_sigaction),
    allow!(SYS_getpid),
    allow!(SYS_tgkill),
    // The process exits when the VM ends.
    allow!(SYS_exit_group),
];

/// What threads spawned by the VMM thread do before their own code runs
/// (glibc and Rust thread start), and what the page server, page fill and
/// live-snapshot copy threads need beyond the VMM thread's own calls.
const SPAWNED: &[Allow] = &[
    // Thread start: rseq and robust-futex registration, the thread's name,
    // its stack bounds (sched_getaffinity in pthread_getattr_np), its id.
    allow!(SYS_rseq),
    allow!(SYS_set_robust_list),
    allow!(SYS_prctl, arg 0 in &[libc::PR_SET_NAME as u64, libc::PR_SET_NO_NEW_PRIVS as u64]),
    allow!(SYS_sched_getaffinity),
    allow!(SYS_gettid),
    // vCPU threads of an API restore then add their own filter (after
    // PR_SET_NO_NEW_PRIVS above); a stacked filter can only narrow what is
    // allowed, never widen it.
    allow!(
        SYS_seccomp,
        args = &[(0, libc::SECCOMP_SET_MODE_FILTER as u64), (1, 0)]
    ),
    // The page server waits on the userfaultfd and its stop eventfd.
    allow!(SYS_poll),
];

/// The VMM thread's list also holds the vCPU list: vCPU threads of a VM
/// restored through the API start under the VMM filter and add theirs.
pub(super) const VMM_GROUPS: &[&[Allow]] = &[RUNTIME, VMM, SPAWNED, VCPU];

// ---------------------------------------------------------------------------
// The snapshot scheduler of a sandbox's VMM (product code, see the parent
// module: unlisted syscalls fail with EPERM rather than kill)
// ---------------------------------------------------------------------------

/// `_IOW(0x94, 9, int)`: the reflink of a disk copy.
pub(super) const FICLONE: u64 = iow(0x94, 9, size_of::<libc::c_int>());

const SCHEDULER: &[Allow] = &[
    // Sandbox and snapshot metadata (atomic JSON writes), the store's flock
    // locks, listing and removing snapshot directories (the reaper), the
    // local time zone (/etc/localtime), /proc/PID for process checks.
    allow!(SYS_openat),
    allow!(SYS_read),
    allow!(SYS_lseek),
    allow!(SYS_fsync),
    allow!(SYS_fdatasync),
    allow!(SYS_statx),
    allow!(SYS_newfstatat),
    allow!(SYS_fstat),
    allow!(SYS_rename),
    allow!(SYS_renameat),
    allow!(SYS_renameat2),
    allow!(SYS_unlink),
    allow!(SYS_unlinkat),
    allow!(SYS_mkdir),
    allow!(SYS_mkdirat),
    allow!(SYS_rmdir),
    allow!(SYS_getdents64),
    allow!(SYS_flock),
    // fdopendir (listing, removing directories) checks the open flags and
    // sets close-on-exec.
    allow!(SYS_fcntl, arg 1 in &[libc::F_GETFL as u64, libc::F_SETFD as u64]),
    // Disk copies: a reflink, else a sparse copy (SEEK_DATA/SEEK_HOLE,
    // positioned reads and writes, the file sized first).
    allow!(SYS_ioctl, arg 1 in &[FICLONE]),
    allow!(SYS_pread64),
    allow!(SYS_pwrite64),
    allow!(SYS_ftruncate),
    allow!(SYS_fallocate),
    // Its own VMM's API socket and the guest agent's vsock socket (Unix
    // sockets with send and receive timeouts).
    allow!(SYS_socket, arg 0 in &[libc::AF_UNIX as u64]),
    allow!(SYS_connect),
    allow!(
        SYS_setsockopt,
        args = &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_RCVTIMEO as u64)]
    ),
    allow!(
        SYS_setsockopt,
        args = &[(1, libc::SOL_SOCKET as u64), (2, libc::SO_SNDTIMEO as u64)]
    ),
    allow!(SYS_recvfrom),
    allow!(SYS_sendto),
    allow!(SYS_shutdown),
    allow!(SYS_poll),
    // Waiting for the next tick; its pid in snapshot metadata.
    allow!(SYS_clock_nanosleep),
    allow!(SYS_nanosleep),
    allow!(SYS_getpid),
    allow!(SYS_gettid),
];

pub(super) const SCHEDULER_GROUPS: &[&[Allow]] = &[RUNTIME, SCHEDULER];

/// What kills the process even from the scheduler thread: no thread of the
/// VMM runs programs, starts processes or reaches into other processes.
pub(super) const ALWAYS_KILL: &[Allow] = &[
    allow!(SYS_execve),
    allow!(SYS_execveat),
    allow!(SYS_fork),
    allow!(SYS_vfork),
    allow!(SYS_ptrace),
    allow!(SYS_process_vm_readv),
    allow!(SYS_process_vm_writev),
    allow!(SYS_kexec_load),
    allow!(SYS_init_module),
    allow!(SYS_finit_module),
    allow!(SYS_mount),
    allow!(SYS_setuid),
    allow!(SYS_bpf),
];
