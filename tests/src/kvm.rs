//! Whether this machine's /dev/kvm can run the direct (non-nested) tests.

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;

/// `KVM_GET_API_VERSION` = _IO(KVMIO, 0x00).
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// The only KVM API version there has ever been.
const KVM_API_VERSION: libc::c_int = 12;

/// Why /dev/kvm is unusable, or None when it works.
pub fn kvm_unusable_reason() -> Option<String> {
    let kvm = match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot open /dev/kvm: {e}")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number; the descriptor
    // is ours and open.
    let version = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if version != KVM_API_VERSION {
        return Some(format!(
            "KVM_GET_API_VERSION returned {version} ({}), expected {KVM_API_VERSION}",
            std::io::Error::last_os_error()
        ));
    }
    None
}

/// Call first in a test that needs this machine's KVM. Returns true when /dev/kvm works. When it
/// does not: panics if `CI=true` (CI must not silently skip), else prints a loud SKIPPED line and
/// returns false so the test can return early.
pub fn require_kvm() -> bool {
    match kvm_unusable_reason() {
        None => true,
        Some(reason) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("/dev/kvm is required when CI=true: {reason}");
            }
            eprintln!("SKIPPED: /dev/kvm is not usable ({reason}); set CI=true to make this fatal");
            false
        }
    }
}
