//! A sandbox's network interface: one host TAP device, chosen when the
//! sandbox is created (`--tap`, with an optional `--mac`). The sandbox's VMM
//! opens the TAP (creating it when the VMM has CAP_NET_ADMIN); host
//! addresses, bridges and routes are left to the user.
//!
//! A restored VM keeps the devices and the MAC address in its snapshot, so a
//! sandbox made from a snapshot of a VM with a network interface needs a TAP
//! of its own: the source's is never reused (two VMMs cannot share one).

use serde::{Deserialize, Serialize};
use vmm::devices_config::MacAddr;

use super::error::{Error, Result};
use super::sandbox::Sandbox;
use super::snapshot::{SnapKind, SnapshotMeta};
use super::store::Kind;
use super::Ctx;

/// The id the VMM gives its first network device: what a restore's TAP
/// override names.
pub const IFACE_ID: &str = "eth0";

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_TAP_LEN: usize = 15;

/// The network interface of a sandbox (and of the VM in a snapshot).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetMeta {
    pub tap: String,
    /// Guest MAC address; without one the guest picks one at each boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl NetMeta {
    /// The `vmm run --net` value.
    pub fn run_arg(&self) -> String {
        match &self.mac {
            Some(mac) => format!("tap={},mac={mac}", self.tap),
            None => format!("tap={}", self.tap),
        }
    }
}

/// `--tap`: a name the kernel and `vmm run --net` both accept.
pub fn parse_tap(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > MAX_TAP_LEN {
        return Err(format!(
            "TAP name {text:?} must be 1 to {MAX_TAP_LEN} characters long"
        ));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if text == "." || text == ".." || !text.chars().all(ok) {
        return Err(format!(
            "TAP name {text:?}: use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(text.to_string())
}

/// `--mac`: six hex byte pairs, kept in the VMM's spelling.
pub fn parse_mac(text: &str) -> Result<String, String> {
    text.parse::<MacAddr>()
        .map(|m| m.to_string())
        .map_err(|e| e.to_string())
}

/// The interface of a new booted sandbox.
pub fn for_boot(tap: Option<&str>, mac: Option<&str>) -> Option<NetMeta> {
    tap.map(|tap| NetMeta {
        tap: tap.to_string(),
        mac: mac.map(str::to_string),
    })
}

/// The interface of a new sandbox made from `snap`: a disk-only snapshot is
/// booted (as [`for_boot`]); a restored VM has exactly the interfaces it had,
/// so a TAP is required when it had one and refused when it had none.
pub fn for_snapshot(
    snap: &SnapshotMeta,
    tap: Option<&str>,
    mac: Option<&str>,
) -> Result<Option<NetMeta>> {
    if snap.kind == SnapKind::Disk {
        return Ok(for_boot(tap, mac));
    }
    let name = &snap.name;
    match (&snap.net, tap) {
        (None, None) => Ok(None),
        (Some(had), None) => Err(Error::Invalid(format!(
            "snapshot {name}'s VM has a network interface (on TAP {} of sandbox {}); give the \
             new sandbox a TAP of its own with --tap NAME",
            had.tap, snap.sandbox
        ))),
        (None, Some(tap)) => Err(Error::Invalid(format!(
            "snapshot {name}'s VM has no network interface to put on TAP {tap}: a restored VM \
             keeps the devices it had (--tap applies to booted sandboxes)"
        ))),
        (Some(_), Some(_)) if mac.is_some() => Err(Error::Invalid(format!(
            "--mac applies only when booting: snapshot {name}'s VM keeps the MAC address it had"
        ))),
        (Some(had), Some(tap)) => Ok(Some(NetMeta {
            tap: tap.to_string(),
            mac: had.mac.clone(),
        })),
    }
}

/// Refuses a TAP that another sandbox has: two VMMs cannot share one, and a
/// stopped sandbox would fail to start again. Run it under the store lock
/// with the recording of the new sandbox (as `Sandbox::create` does), or two
/// creations could both pass it.
pub fn check_free(ctx: &Ctx, net: Option<&NetMeta>) -> Result<()> {
    let Some(net) = net else {
        return Ok(());
    };
    for name in ctx.store.names(Kind::Sandbox)? {
        let Ok(sb) = Sandbox::load(ctx, &name) else {
            continue;
        };
        if sb.meta.net.as_ref().is_some_and(|n| n.tap == net.tap) {
            return Err(Error::Invalid(format!(
                "TAP {} is sandbox {name}'s; give another one with --tap",
                net.tap
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_and_mac_values() {
        assert_eq!(parse_tap("tap0").unwrap(), "tap0");
        assert_eq!(parse_tap("vm-tap_1.a").unwrap(), "vm-tap_1.a");
        for bad in [
            "",
            "a-very-long-tap-name",
            "..",
            "tap/0",
            "tap 0",
            "tap,mac=x",
            "t=1",
        ] {
            assert!(parse_tap(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_mac("02:AA:00:00:00:01").unwrap(), "02:aa:00:00:00:01");
        assert!(parse_mac("02:aa").unwrap_err().contains("MAC"));
        let n = for_boot(Some("tap0"), Some("02:00:00:00:00:01")).unwrap();
        assert_eq!(n.run_arg(), "tap=tap0,mac=02:00:00:00:00:01");
        assert_eq!(for_boot(Some("tap1"), None).unwrap().run_arg(), "tap=tap1");
        assert_eq!(for_boot(None, None), None);
    }

    #[test]
    fn restored_vms_need_a_tap_of_their_own() {
        let mut snap = crate::product::snapshot::tests::meta("s", None);
        // No interface in the snapshot: none, and --tap is refused.
        assert_eq!(for_snapshot(&snap, None, None).unwrap(), None);
        let e = for_snapshot(&snap, Some("tap9"), None).unwrap_err();
        assert!(e.to_string().contains("no network interface"), "{e}");
        // An interface: a TAP is required, the MAC is the snapshot's.
        snap.net = Some(NetMeta {
            tap: "tap0".into(),
            mac: Some("02:00:00:00:00:01".into()),
        });
        let e = for_snapshot(&snap, None, None).unwrap_err().to_string();
        assert!(
            e.contains("has a network interface (on TAP tap0 of sandbox dev)")
                && e.contains("--tap NAME"),
            "{e}"
        );
        let n = for_snapshot(&snap, Some("tap1"), None).unwrap().unwrap();
        assert_eq!(
            (n.tap.as_str(), n.mac.as_deref()),
            ("tap1", Some("02:00:00:00:00:01"))
        );
        let e = for_snapshot(&snap, Some("tap1"), Some("02:00:00:00:00:02")).unwrap_err();
        assert!(
            e.to_string().contains("--mac applies only when booting"),
            "{e}"
        );
        // A disk-only snapshot is booted: any TAP, or none.
        snap.kind = SnapKind::Disk;
        assert_eq!(for_snapshot(&snap, None, None).unwrap(), None);
        let n = for_snapshot(&snap, Some("tap2"), Some("02:00:00:00:00:02")).unwrap();
        assert_eq!(n.unwrap().run_arg(), "tap=tap2,mac=02:00:00:00:00:02");
    }
}
