//! Why a VM stops, reported once by whichever part notices first (a vCPU,
//! the i8042 reset line, the console's panic watch), and how that maps to
//! the VMM's exit code.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest rebooted or powered off (i8042 reset, system event).
    GuestReset,
    /// The guest kernel panicked; the line it printed.
    GuestPanic(String),
    /// A vCPU halted with interrupts off and no way to wake.
    GuestHalted { vcpu: u8 },
    /// A triple fault.
    TripleFault { vcpu: u8, rip: Option<u64> },
    /// KVM reported an error or an exit the VMM cannot handle.
    VcpuError {
        vcpu: u8,
        exit: String,
        rip: Option<u64>,
    },
    /// The VMM itself failed (a device, the event loop).
    VmmError(String),
    /// Asked to stop by the user (signal, API).
    Requested,
}

impl StopReason {
    /// Process exit code: 0 for an orderly end, 2 for a guest crash, 1 for a
    /// VMM failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestReset | StopReason::Requested => 0,
            StopReason::VmmError(_) => 1,
            _ => 2,
        }
    }

    pub(crate) fn with_rip(self, rip: impl FnOnce() -> Option<u64>) -> Self {
        match self {
            StopReason::TripleFault { vcpu, rip: None } => {
                StopReason::TripleFault { vcpu, rip: rip() }
            }
            StopReason::VcpuError {
                vcpu,
                exit,
                rip: None,
            } => StopReason::VcpuError {
                vcpu,
                exit,
                rip: rip(),
            },
            other => other,
        }
    }
}

fn fmt_rip(rip: &Option<u64>) -> String {
    rip.map(|r| format!("{r:#x}"))
        .unwrap_or_else(|| "unknown".into())
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::GuestReset => write!(f, "guest rebooted or powered off"),
            StopReason::GuestPanic(line) => write!(f, "guest kernel panicked: {line}"),
            StopReason::GuestHalted { vcpu } => {
                write!(f, "vCPU {vcpu} halted for good (KVM_EXIT_HLT)")
            }
            StopReason::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "vCPU {vcpu}: guest triple fault (KVM_EXIT_SHUTDOWN) at RIP {}",
                    fmt_rip(rip)
                )
            }
            StopReason::VcpuError { vcpu, exit, rip } => {
                write!(f, "vCPU {vcpu}: {exit} at guest RIP {}", fmt_rip(rip))
            }
            StopReason::VmmError(e) => write!(f, "VMM error: {e}"),
            StopReason::Requested => write!(f, "stopped on request"),
        }
    }
}

/// The first stop reason, and an eventfd that wakes the event loop.
pub struct VmStop {
    reason: Mutex<Option<StopReason>>,
    evt: EventFd,
}

impl VmStop {
    /// A fresh, unsignalled stop.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the loop.
    pub fn report(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
        }
        drop(slot);
        if let Err(e) = self.evt.write(1) {
            log::error!("cannot wake the event loop: {e}");
        }
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The eventfd written on every report.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// The i8042's CPU reset line: records the guest reset at once, on the
/// vCPU thread that pulled it, so the triple fault Linux's reboot falls back
/// to a moment later cannot be reported first.
pub struct GuestResetLine(pub Arc<VmStop>);

impl devices::legacy::ResetLine for GuestResetLine {
    fn pull(&self) {
        self.0.report(StopReason::GuestReset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_map() {
        let stop = VmStop::new().unwrap();
        assert_eq!(stop.reason(), None);
        stop.report(StopReason::GuestReset);
        stop.report(StopReason::VmmError("late".into()));
        assert_eq!(stop.reason(), Some(StopReason::GuestReset));
        assert_eq!(stop.eventfd().read().unwrap(), 2);
        assert_eq!(StopReason::GuestReset.exit_code(), 0);
        assert_eq!(StopReason::GuestPanic("x".into()).exit_code(), 2);
        assert_eq!(StopReason::VmmError("x".into()).exit_code(), 1);
        let msg = StopReason::VcpuError {
            vcpu: 1,
            exit: "KVM_EXIT_INTERNAL_ERROR".into(),
            rip: Some(0x1000),
        }
        .to_string();
        assert_eq!(msg, "vCPU 1: KVM_EXIT_INTERNAL_ERROR at guest RIP 0x1000");
    }

    #[test]
    fn reset_line_records_the_reset_before_a_later_triple_fault() {
        use devices::legacy::ResetLine;
        let stop = Arc::new(VmStop::new().unwrap());
        GuestResetLine(stop.clone()).pull();
        stop.report(StopReason::TripleFault { vcpu: 1, rip: None });
        assert_eq!(stop.reason(), Some(StopReason::GuestReset));
        assert_eq!(
            stop.eventfd().read().unwrap(),
            2,
            "both reports wake the loop"
        );
    }
}
