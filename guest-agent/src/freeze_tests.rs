//! Tests of mount selection and of the freeze controller over a fake
//! filesystem (real FIFREEZE needs root and a scratch filesystem).

use super::*;
use std::collections::BTreeSet;

const MOUNTS: &str = "\
/dev/root / ext4 rw,relatime 0 0
devtmpfs /dev devtmpfs rw,relatime,size=1000k,nr_inodes=250,mode=755 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
tmpfs /run tmpfs rw,nosuid,nodev 0 0
/dev/vdb /data ext4 rw,relatime 0 0
/dev/vdc /mnt/ro\\040disk ext4 ro,relatime 0 0
/dev/vdb /srv/bind ext4 rw,relatime 0 0
/dev/vdd /hidden xfs rw 0 0
tmpfs /hidden tmpfs rw 0 0
/dev/vde /with\\040space\\134x ext4 rw 0 0
garbage-line
";

#[test]
fn parses_and_unescapes() {
    let m = parse_mounts(MOUNTS);
    assert_eq!(m.len(), 11);
    assert_eq!(m[0].source, "/dev/root");
    assert_eq!(m[0].fstype, "ext4");
    assert_eq!(m[0].options, vec!["rw", "relatime"]);
    assert_eq!(m[6].mountpoint, "/mnt/ro disk");
    assert_eq!(m[10].mountpoint, "/with space\\x");
    assert_eq!(unescape("a\\01"), "a\\01");
    assert_eq!(unescape("\\011\\012"), "\t\n");
}

#[test]
fn freeze_selection_is_writable_visible_block_mounts_deduplicated() {
    assert_eq!(
        freeze_candidates(MOUNTS),
        vec!["/", "/data", "/with space\\x"]
    );
    assert_eq!(
        thaw_candidates(MOUNTS),
        vec!["/", "/data", "/mnt/ro disk", "/with space\\x"]
    );
    assert!(freeze_candidates("").is_empty());
}

/// Records calls; fails freeze/thaw for configured mountpoints.
#[derive(Default)]
struct FakeFs {
    frozen: Mutex<BTreeSet<String>>,
    log: Mutex<Vec<String>>,
    fail_freeze: Option<String>,
    fail_thaw: Mutex<Option<String>>,
}

impl FsOps for Arc<FakeFs> {
    fn mounts(&self) -> io::Result<String> {
        Ok(MOUNTS.to_string())
    }

    fn freeze(&self, mp: &str) -> io::Result<()> {
        self.log.lock().unwrap().push(format!("freeze {mp}"));
        if self.fail_freeze.as_deref() == Some(mp) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        if !self.frozen.lock().unwrap().insert(mp.to_string()) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(())
    }

    fn thaw(&self, mp: &str) -> io::Result<()> {
        self.log.lock().unwrap().push(format!("thaw {mp}"));
        if self.fail_thaw.lock().unwrap().as_deref() == Some(mp) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if !self.frozen.lock().unwrap().remove(mp) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

fn controller(fs: &Arc<FakeFs>) -> FreezeController {
    FreezeController::new(Box::new(Arc::clone(fs)))
}

fn frozen(fs: &FakeFs) -> Vec<String> {
    fs.frozen.lock().unwrap().iter().cloned().collect()
}

#[test]
fn freeze_then_thaw_in_reverse_order() {
    let fs = Arc::new(FakeFs::default());
    let c = controller(&fs);
    let got = c.freeze(&FreezeRequest::default()).unwrap();
    assert_eq!(got, vec!["/", "/data", "/with space\\x"]);
    assert!(c.is_frozen());
    assert!(matches!(
        c.freeze(&FreezeRequest::default()),
        Err(FreezeError::AlreadyFrozen(_))
    ));
    let thawed = c.thaw().unwrap();
    assert_eq!(thawed, vec!["/with space\\x", "/data", "/"]);
    assert!(!c.is_frozen());
    assert!(frozen(&fs).is_empty());
    // Nothing recorded: thaw sweeps all candidates and reports none thawed.
    assert!(c.thaw().unwrap().is_empty());
}

#[test]
fn failed_freeze_rolls_back() {
    let fs = Arc::new(FakeFs {
        fail_freeze: Some("/data".into()),
        ..FakeFs::default()
    });
    let c = controller(&fs);
    match c.freeze(&FreezeRequest::default()) {
        Err(FreezeError::Freeze { mountpoint, .. }) => assert_eq!(mountpoint, "/data"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(!c.is_frozen());
    assert!(frozen(&fs).is_empty());
    assert_eq!(
        *fs.log.lock().unwrap(),
        vec!["freeze /", "freeze /data", "thaw /"]
    );
}

#[test]
fn explicit_list_and_validation() {
    let fs = Arc::new(FakeFs::default());
    let c = controller(&fs);
    let req = |mps: &[&str], t: Option<u64>| FreezeRequest {
        mountpoints: Some(mps.iter().map(|s| s.to_string()).collect()),
        timeout_ms: t,
    };
    assert!(matches!(
        c.freeze(&req(&[], None)),
        Err(FreezeError::NothingToFreeze)
    ));
    assert!(matches!(
        c.freeze(&req(&["rel"], None)),
        Err(FreezeError::NotAbsolute(_))
    ));
    assert!(matches!(
        c.freeze(&req(&["/x"], Some(0))),
        Err(FreezeError::InvalidTimeout(0))
    ));
    assert!(matches!(
        c.freeze(&req(&["/x"], Some(MAX_FREEZE_TIMEOUT_MS + 1))),
        Err(FreezeError::InvalidTimeout(_))
    ));
    assert_eq!(c.freeze(&req(&["/x", "/x"], None)).unwrap(), vec!["/x"]);
    assert_eq!(frozen(&fs), vec!["/x"]);
    c.thaw().unwrap();
}

#[test]
fn watchdog_thaws_at_deadline_and_retries_failures() {
    let fs = Arc::new(FakeFs::default());
    *fs.fail_thaw.lock().unwrap() = Some("/data".into());
    let c = controller(&fs);
    c.freeze(&FreezeRequest {
        mountpoints: None,
        timeout_ms: Some(100),
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    // First attempt thawed all but /data.
    assert_eq!(frozen(&fs), vec!["/data"]);
    assert!(c.is_frozen());
    *fs.fail_thaw.lock().unwrap() = None;
    let t = Instant::now();
    while c.is_frozen() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!c.is_frozen());
    assert!(frozen(&fs).is_empty());
}

#[test]
fn explicit_thaw_disarms_watchdog() {
    let fs = Arc::new(FakeFs::default());
    let c = controller(&fs);
    c.freeze(&FreezeRequest {
        mountpoints: Some(vec!["/a".into()]),
        timeout_ms: Some(150),
    })
    .unwrap();
    c.thaw().unwrap();
    // A new freeze must not be ended by the first freeze's watchdog.
    c.freeze(&FreezeRequest {
        mountpoints: Some(vec!["/b".into()]),
        timeout_ms: Some(60_000),
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(frozen(&fs), vec!["/b"]);
    c.thaw().unwrap();
}

#[test]
fn thaw_all_ignores_not_frozen() {
    let fs = Arc::new(FakeFs::default());
    fs.frozen.lock().unwrap().insert("/data".into());
    let c = controller(&fs);
    assert_eq!(c.thaw_all().unwrap(), vec!["/data"]);
    assert!(frozen(&fs).is_empty());
}

/// Real FIFREEZE/FITHAW on a scratch filesystem. Needs root; run with
/// `GA_FREEZE_TEST_MOUNT=/mnt/scratch cargo test -p guest-agent -- --ignored`.
#[test]
#[ignore = "needs root and a scratch mount in GA_FREEZE_TEST_MOUNT"]
fn real_freeze_blocks_writes_until_thaw() {
    let Some(mnt) = std::env::var_os("GA_FREEZE_TEST_MOUNT") else {
        panic!("set GA_FREEZE_TEST_MOUNT to a scratch mountpoint");
    };
    let mnt = mnt.to_string_lossy().into_owned();
    let c = FreezeController::system();
    let target = format!("{mnt}/frozen-write-probe");
    // Not frozen: FITHAW reports EINVAL, which the sweep ignores.
    assert_eq!(
        SystemFs.thaw(&mnt).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    assert_eq!(
        c.freeze(&FreezeRequest {
            mountpoints: Some(vec![mnt.clone()]),
            timeout_ms: Some(60_000),
        })
        .unwrap(),
        vec![mnt.clone()]
    );
    // A writer blocks (uninterruptibly) until the thaw.
    let mut writer = std::process::Command::new("sh")
        .args(["-c", "echo x > \"$1\"", "sh", &target])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        writer.try_wait().unwrap().is_none(),
        "write went through a frozen fs"
    );
    assert_eq!(c.thaw().unwrap(), vec![mnt.clone()]);
    assert!(writer.wait().unwrap().success());
    assert_eq!(std::fs::read(&target).unwrap(), b"x\n");
    std::fs::remove_file(&target).unwrap();
}
