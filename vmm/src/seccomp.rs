//! seccomp filters, one allow-list per thread kind.
//!
//! Each kind of VMM thread installs its own filter before it touches guest
//! input: the vCPU threads before their first `KVM_RUN`, the API thread
//! before its first `accept`, the VMM (event-loop) thread when the
//! controller's loop starts. A syscall outside the list kills the whole
//! process (`SECCOMP_RET_KILL_PROCESS`, the process dies of `SIGSYS`), except
//! the few that libc makes on its own and copes without (glibc's malloc
//! reading /proc/sys/vm/overcommit_memory): those fail with `EACCES`.
//!
//! The lists are data ([`tables`]): each entry is a syscall, optionally with
//! the argument values it may take (ioctl requests, `fcntl` commands, futex
//! operations, no `PROT_EXEC` for `mmap`/`mprotect`...), grouped with the
//! reason it is needed. They were derived by tracing the real workloads
//! (`strace -f -ff -X raw`: boot with every device, pause, Full/Diff/Live
//! snapshots, merge, restore from File and Uffd backends with working-set
//! record/prefetch/background fill, vsock connections, SIGTERM, the guest's
//! own end) and checked against the code paths those runs could not reach.
//!
//! Threads inherit the filter of the thread that spawns them. The page
//! server, the background page fill and the live-snapshot copy thread are
//! spawned from the VMM thread and run under its filter, so the VMM list
//! carries what they need. vCPU threads started by a restore through the API
//! are spawned after the VMM filter is in place and stack their own filter on
//! top of it (the kernel applies both), so the VMM filter also allows
//! everything a vCPU does.
//!
//! The snapshot scheduler of a sandbox's VMM (`vmm run --sandbox`, the
//! product's automatic snapshots) is the one kind whose filter does not
//! kill on an unlisted syscall: it runs product code (store metadata,
//! reflink or sparse disk copies, the reaper's removals, the guest agent's
//! socket) whose rarer paths a trace cannot all reach, and a syscall missed
//! there should fail one scheduled snapshot, not kill the user's sandbox.
//! The syscall still does not run. What no thread may ever do (exec, fork,
//! ptrace, reading or writing other processes) kills even there.
//!
//! Seccomp is on unless [`set_enabled`]`(false)` (`vmm run --no-seccomp`):
//! it is a property of the whole VMM process, read by each thread as it
//! starts, hence one process-wide switch rather than a field threaded through
//! every constructor.

mod tables;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use tables::{Allow, Args};

/// The kinds of VMM thread, each with its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The VMM thread: the controller's event loop (devices' I/O, API
    /// actions, snapshots, restores through the API) and the worker threads
    /// it spawns (page server, page fill, live-snapshot copy, and vCPU
    /// threads started by an API restore before they add their own filter).
    Vmm,
    /// A vCPU thread: `KVM_RUN`, port/MMIO emulation, state save when paused.
    Vcpu,
    /// The control API server thread.
    Api,
    /// The sandbox's snapshot scheduler (product code: store files, disk
    /// copies, its own API socket, the guest agent's socket). Started
    /// before any other thread so it inherits no filter, then installs
    /// this one; unlisted syscalls fail with `EPERM` (see the module doc).
    Scheduler,
}

impl ThreadKind {
    /// Every kind, for tests and listings.
    pub const ALL: [ThreadKind; 4] = [
        ThreadKind::Vmm,
        ThreadKind::Vcpu,
        ThreadKind::Api,
        ThreadKind::Scheduler,
    ];

    /// The entries of this kind's allow-list, group by group.
    pub fn allow_list(self) -> Vec<&'static Allow> {
        let groups: &[&[Allow]] = match self {
            ThreadKind::Vmm => tables::VMM_GROUPS,
            ThreadKind::Vcpu => tables::VCPU_GROUPS,
            ThreadKind::Api => tables::API_GROUPS,
            ThreadKind::Scheduler => tables::SCHEDULER_GROUPS,
        };
        groups.iter().flat_map(|g| g.iter()).collect()
    }

    /// Syscalls this kind's threads see fail with `EACCES` rather than die
    /// on: calls libc makes behind the program's back and copes without.
    pub fn fail_list(self) -> &'static [Allow] {
        match self {
            ThreadKind::Vmm | ThreadKind::Scheduler => &[],
            ThreadKind::Vcpu | ThreadKind::Api => tables::FAIL_OPEN,
        }
    }

    /// Syscalls that kill the process even though this kind's other
    /// unlisted syscalls only fail (empty for kinds where every unlisted
    /// syscall kills).
    pub fn kill_list(self) -> &'static [Allow] {
        match self {
            ThreadKind::Scheduler => tables::ALWAYS_KILL,
            ThreadKind::Vmm | ThreadKind::Vcpu | ThreadKind::Api => &[],
        }
    }

    /// What a syscall in none of the lists gets.
    fn unlisted_action(self) -> SeccompAction {
        match self {
            ThreadKind::Scheduler => SeccompAction::Errno(libc::EPERM as u32),
            ThreadKind::Vmm | ThreadKind::Vcpu | ThreadKind::Api => SeccompAction::KillProcess,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
            ThreadKind::Scheduler => "scheduler",
        }
    }
}

impl std::fmt::Display for ThreadKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {kind} seccomp filter: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the {kind} seccomp filter to BPF: {source}")]
    Compile {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the {kind} seccomp filter: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns filtering on or off for threads started from now on (`--no-seccomp`
/// is for debugging). Call it before building or restoring a VM.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::SeqCst);
}

/// Whether threads install their filters.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::SeqCst)
}

/// The architecture the filters are compiled for.
#[cfg(target_arch = "x86_64")]
const ARCH: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const ARCH: TargetArch = TargetArch::aarch64;

/// Compiles `kind`'s filters, in the order they are installed: for a kind
/// with a [`ThreadKind::fail_list`], first a program answering those
/// syscalls with `EACCES` (and allowing the rest); for a kind with a
/// [`ThreadKind::kill_list`], a program killing on those (and allowing the
/// rest); then the allow-list, whose default action kills the process (or,
/// for the scheduler, fails the call with `EPERM`). The kernel runs every
/// installed program and the strictest answer wins, so a syscall in no list
/// kills (fails), one in the fail list fails, one in the kill list kills,
/// one in the allow list runs.
pub fn compile(kind: ThreadKind) -> Result<Vec<BpfProgram>, SeccompError> {
    compile_for(kind, ARCH)
}

fn compile_for(kind: ThreadKind, arch: TargetArch) -> Result<Vec<BpfProgram>, SeccompError> {
    let mut programs = Vec::new();
    let fail = kind.fail_list();
    if !fail.is_empty() {
        programs.push(program(
            kind,
            fail.iter(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            arch,
        )?);
    }
    let kill = kind.kill_list();
    if !kill.is_empty() {
        programs.push(program(
            kind,
            kill.iter(),
            SeccompAction::Allow,
            SeccompAction::KillProcess,
            arch,
        )?);
    }
    // The allow-list program lets the fail list through to the first one.
    programs.push(program(
        kind,
        kind.allow_list().into_iter().chain(fail),
        kind.unlisted_action(),
        SeccompAction::Allow,
        arch,
    )?);
    Ok(programs)
}

/// One BPF program: `matched` for the entries, `otherwise` for the rest.
fn program<'a>(
    kind: ThreadKind,
    entries: impl Iterator<Item = &'a Allow>,
    otherwise: SeccompAction,
    matched: SeccompAction,
    arch: TargetArch,
) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut unconditional: Vec<i64> = Vec::new();
    for entry in entries {
        let nr = entry.nr;
        let new = entry
            .rules()
            .map_err(|source| SeccompError::Build { kind, source })?;
        if new.is_empty() {
            unconditional.push(nr);
        }
        rules.entry(nr).or_default().extend(new);
    }
    // An entry without argument conditions matches the syscall outright,
    // whatever other entries of the same syscall restrict.
    for nr in unconditional {
        rules.insert(nr, Vec::new());
    }
    let filter = SeccompFilter::new(rules, otherwise, matched, arch)
        .map_err(|source| SeccompError::Build { kind, source })?;
    filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })
}

/// Installs `kind`'s filters on the calling thread, unless seccomp is
/// disabled. Threads this one spawns afterwards inherit them.
pub fn install(kind: ThreadKind) -> Result<(), SeccompError> {
    if !enabled() {
        log::debug!("seccomp disabled: no {kind} filter");
        return Ok(());
    }
    install_filter(kind)
}

/// Installs `kind`'s filters regardless of [`enabled`].
fn install_filter(kind: ThreadKind) -> Result<(), SeccompError> {
    for program in compile(kind)? {
        seccompiler::apply_filter(&program)
            .map_err(|source| SeccompError::Install { kind, source })?;
    }
    log::debug!(
        "seccomp: {kind} filter installed ({} syscalls)",
        kind.allow_list().len()
    );
    Ok(())
}

impl Allow {
    /// The seccompiler rules for this entry; empty means "any arguments".
    fn rules(&self) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        let eq = |arg: u8, value: u64| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        };
        match self.args {
            Args::Any => Ok(Vec::new()),
            Args::OneOf(arg, values) => values
                .iter()
                .map(|&v| SeccompRule::new(vec![eq(arg, v)?]))
                .collect(),
            Args::AllOf(pairs) => {
                let conditions = pairs
                    .iter()
                    .map(|&(arg, v)| eq(arg, v))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(vec![SeccompRule::new(conditions)?])
            }
            Args::NoBits(arg, mask) => Ok(vec![SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(mask),
                0,
            )?])?]),
        }
    }
}

#[cfg(test)]
mod tests;
