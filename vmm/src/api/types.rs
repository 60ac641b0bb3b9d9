//! The JSON bodies of the control API and their validation. Field names and
//! enum spellings follow Firecracker's (case-sensitive), so its users' requests
//! work unchanged where the features overlap. The same types serve a client
//! (they serialize to exactly what the server accepts).

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Longest Linux network interface name (IFNAMSIZ minus the NUL).
const MAX_IFACE_NAME: usize = 15;

/// The state `PATCH /vm` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateChange {
    Paused,
    Resumed,
}

/// Body of `PATCH /vm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchVm {
    pub state: VmStateChange,
}

pub use crate::snapshot::SnapshotType;

/// Body of `PUT /snapshot/create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotParams {
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the VM state file goes.
    pub snapshot_path: PathBuf,
    /// Where the guest memory file goes.
    pub mem_file_path: PathBuf,
}

/// How a restored VM gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Map the memory file (private, copy-on-write).
    File,
    /// Serve page faults through userfaultfd; the path is the memory file.
    Uffd,
}

/// Where a restored VM's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: PathBuf,
}

/// Gives a restored network interface another host TAP device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// Gives the restored vsock device another host Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// Gives a restored block device another backing file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    pub drive_id: String,
    pub path_on_host: PathBuf,
}

/// Body of `PUT /snapshot/load`. Also accepts Firecracker's older
/// `"mem_file_path": "..."` in place of `mem_backend` (a `File` backend);
/// serializes in the current shape only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "LoadSnapshotWire")]
pub struct LoadSnapshotParams {
    pub snapshot_path: PathBuf,
    pub mem_backend: MemBackend,
    /// Resume the VM once loaded (otherwise it stays Paused).
    pub resume_vm: bool,
    /// Track dirty pages in the restored VM (for later diff snapshots).
    pub track_dirty_pages: bool,
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    pub drive_overrides: Vec<DriveOverride>,
    /// Working-set handling of the `Uffd` backend.
    pub working_set: WorkingSetParams,
}

/// How a `Uffd` restore uses the snapshot's working set (the pages a guest
/// touched first after an earlier restore, kept beside the memory file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetParams {
    /// Prefetch the saved working set, if there is one, before resuming.
    #[serde(default = "yes")]
    pub prefetch: bool,
    /// Record the pages touched in the first this-many milliseconds and save
    /// them as the working set (0: only on `PUT /actions SaveWorkingSet`).
    #[serde(default)]
    pub record_ms: u64,
    /// Fill the remaining pages in the background after resuming.
    #[serde(default = "yes")]
    pub background_fill: bool,
}

fn yes() -> bool {
    true
}

impl Default for WorkingSetParams {
    fn default() -> Self {
        Self {
            prefetch: true,
            record_ms: 0,
            background_fill: true,
        }
    }
}

/// What `PUT /snapshot/load` accepts on the wire, before the old and new
/// memory spellings become one.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadSnapshotWire {
    snapshot_path: PathBuf,
    #[serde(default)]
    mem_backend: Option<MemBackend>,
    #[serde(default)]
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    resume_vm: bool,
    #[serde(default)]
    track_dirty_pages: bool,
    #[serde(default)]
    network_overrides: Vec<NetworkOverride>,
    #[serde(default)]
    vsock_override: Option<VsockOverride>,
    #[serde(default)]
    drive_overrides: Vec<DriveOverride>,
    #[serde(default)]
    working_set: WorkingSetParams,
}

impl TryFrom<LoadSnapshotWire> for LoadSnapshotParams {
    type Error = String;

    fn try_from(w: LoadSnapshotWire) -> Result<Self, String> {
        let mem_backend = match (w.mem_backend, w.mem_file_path) {
            (Some(b), None) => b,
            (None, Some(path)) => MemBackend {
                backend_type: MemBackendType::File,
                backend_path: path,
            },
            (Some(_), Some(_)) => {
                return Err("give either `mem_backend` or `mem_file_path`, not both".into())
            }
            (None, None) => return Err("missing field `mem_backend`".into()),
        };
        Ok(Self {
            snapshot_path: w.snapshot_path,
            mem_backend,
            resume_vm: w.resume_vm,
            track_dirty_pages: w.track_dirty_pages,
            network_overrides: w.network_overrides,
            vsock_override: w.vsock_override,
            drive_overrides: w.drive_overrides,
            working_set: w.working_set,
        })
    }
}

/// Body of `PUT /snapshot/merge`: writes the pages of a diff memory file onto
/// its base, so the base becomes a full memory file matching the diff's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MergeDiffParams {
    pub base_mem_file_path: PathBuf,
    pub diff_mem_file_path: PathBuf,
    /// The state file saved with the diff (it describes the memory layout).
    pub snapshot_path: PathBuf,
}

/// What `PUT /actions` can ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// End the VMM gracefully.
    Stop,
    /// Stop recording the working set of a `Uffd` restore and save it now
    /// (e.g. when the guest is ready).
    SaveWorkingSet,
}

/// Body of `PUT /actions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    pub action_type: ActionType,
}

/// Body of `GET /version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionInfo {
    pub vmm_version: String,
    pub api_version: String,
}

/// Body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub fault_message: String,
}

/// Checks a path given in a body: not empty, no NUL byte (the kernel would
/// cut it there).
fn check_path(field: &str, path: &Path) -> Result<(), String> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return Err(format!("`{field}` must not be empty"));
    }
    if bytes.contains(&0) {
        return Err(format!("`{field}` must not contain a NUL byte"));
    }
    Ok(())
}

fn check_id(field: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("`{field}` must not be empty"));
    }
    if id.contains('\0') {
        return Err(format!("`{field}` must not contain a NUL byte"));
    }
    Ok(())
}

/// Two paths a request names must not be the same file name.
fn check_distinct(a: (&str, &Path), b: (&str, &Path)) -> Result<(), String> {
    if a.1 == b.1 {
        return Err(format!(
            "`{}` and `{}` must differ (both are {})",
            a.0,
            b.0,
            a.1.display()
        ));
    }
    Ok(())
}

impl CreateSnapshotParams {
    /// Rejects values serde accepts but the VMM cannot use.
    pub fn validate(&self) -> Result<(), String> {
        check_path("snapshot_path", &self.snapshot_path)?;
        check_path("mem_file_path", &self.mem_file_path)?;
        check_distinct(
            ("snapshot_path", &self.snapshot_path),
            ("mem_file_path", &self.mem_file_path),
        )
    }
}

impl LoadSnapshotParams {
    /// Rejects values serde accepts but the VMM cannot use.
    pub fn validate(&self) -> Result<(), String> {
        check_path("snapshot_path", &self.snapshot_path)?;
        check_path("mem_backend.backend_path", &self.mem_backend.backend_path)?;
        let mut ifaces = HashSet::new();
        for o in &self.network_overrides {
            check_id("network_overrides[].iface_id", &o.iface_id)?;
            check_iface_name(&o.host_dev_name)?;
            if !ifaces.insert(o.iface_id.as_str()) {
                return Err(format!(
                    "`network_overrides` names iface_id {:?} twice",
                    o.iface_id
                ));
            }
        }
        if let Some(v) = &self.vsock_override {
            check_path("vsock_override.uds_path", &v.uds_path)?;
        }
        let mut drives = HashSet::new();
        for o in &self.drive_overrides {
            check_id("drive_overrides[].drive_id", &o.drive_id)?;
            check_path("drive_overrides[].path_on_host", &o.path_on_host)?;
            if !drives.insert(o.drive_id.as_str()) {
                return Err(format!(
                    "`drive_overrides` names drive_id {:?} twice",
                    o.drive_id
                ));
            }
        }
        Ok(())
    }
}

/// A TAP device name the kernel accepts.
fn check_iface_name(name: &str) -> Result<(), String> {
    const FIELD: &str = "network_overrides[].host_dev_name";
    check_id(FIELD, name)?;
    if name.len() > MAX_IFACE_NAME {
        return Err(format!(
            "`{FIELD}` {name:?} is longer than {MAX_IFACE_NAME} bytes"
        ));
    }
    if name.contains(|c: char| c == '/' || c.is_whitespace()) {
        return Err(format!(
            "`{FIELD}` {name:?} must not contain '/' or whitespace"
        ));
    }
    Ok(())
}

impl MergeDiffParams {
    /// Rejects values serde accepts but the VMM cannot use.
    pub fn validate(&self) -> Result<(), String> {
        let base = ("base_mem_file_path", self.base_mem_file_path.as_path());
        let diff = ("diff_mem_file_path", self.diff_mem_file_path.as_path());
        let state = ("snapshot_path", self.snapshot_path.as_path());
        for (field, path) in [base, diff, state] {
            check_path(field, path)?;
        }
        check_distinct(base, diff)?;
        check_distinct(base, state)?;
        check_distinct(diff, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(json: &str) -> Result<LoadSnapshotParams, String> {
        let p: LoadSnapshotParams = serde_json::from_str(json).map_err(|e| e.to_string())?;
        p.validate()?;
        Ok(p)
    }

    #[test]
    fn load_full_and_defaults() {
        let p = load(
            r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"/m"},
                "resume_vm":true,"network_overrides":[{"iface_id":"eth0","host_dev_name":"tap1"}],
                "vsock_override":{"uds_path":"/v.sock"},
                "drive_overrides":[{"drive_id":"rootfs","path_on_host":"/d.ext4"}]}"#,
        )
        .unwrap();
        assert_eq!(p.mem_backend.backend_type, MemBackendType::Uffd);
        assert!(p.resume_vm && !p.track_dirty_pages);
        assert_eq!(p.network_overrides[0].host_dev_name, "tap1");
        assert_eq!(p.vsock_override.unwrap().uds_path, Path::new("/v.sock"));

        let p = load(r#"{"snapshot_path":"s","mem_file_path":"m"}"#).unwrap();
        assert_eq!(
            p.mem_backend,
            MemBackend {
                backend_type: MemBackendType::File,
                backend_path: "m".into()
            }
        );
        assert!(!p.resume_vm && p.network_overrides.is_empty() && p.vsock_override.is_none());
    }

    #[test]
    fn load_round_trips_through_serialize() {
        let p =
            load(r#"{"snapshot_path":"s","mem_file_path":"m","track_dirty_pages":true}"#).unwrap();
        let text = serde_json::to_string(&p).unwrap();
        assert!(!text.contains("mem_file_path"), "{text}");
        assert_eq!(load(&text).unwrap(), p);
    }

    #[test]
    fn load_rejections() {
        let cases = [
            (r#"{"snapshot_path":"s"}"#, "missing field `mem_backend`"),
            (
                r#"{"snapshot_path":"s","mem_file_path":"m","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
                "not both",
            ),
            (
                r#"{"snapshot_path":"s","mem_file_path":"m","bogus":1}"#,
                "unknown field `bogus`",
            ),
            (
                r#"{"snapshot_path":"s","mem_backend":{"backend_type":"file","backend_path":"m"}}"#,
                "unknown variant `file`",
            ),
            (
                r#"{"snapshot_path":"s","mem_backend":{"backend_type":"File","backend_path":"m","x":0}}"#,
                "unknown field `x`",
            ),
            (
                r#"{"snapshot_path":"","mem_file_path":"m"}"#,
                "`snapshot_path` must not be empty",
            ),
            (r#"{"snapshot_path":"s","mem_file_path":"m\u0000x"}"#, "NUL"),
            (
                r#"{"snapshot_path":"s","mem_file_path":"m","network_overrides":[{"iface_id":"a","host_dev_name":"0123456789abcdef"}]}"#,
                "longer than 15",
            ),
            (
                r#"{"snapshot_path":"s","mem_file_path":"m","network_overrides":[{"iface_id":"a","host_dev_name":"t"},{"iface_id":"a","host_dev_name":"u"}]}"#,
                "twice",
            ),
            (
                r#"{"snapshot_path":"s","mem_file_path":"m","drive_overrides":[{"drive_id":"","path_on_host":"p"}]}"#,
                "drive_id` must not be empty",
            ),
            (
                r#"{"snapshot_path":"s","mem_file_path":"m","resume_vm":"yes"}"#,
                "invalid type",
            ),
        ];
        for (json, want) in cases {
            let err = load(json).unwrap_err();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn create_and_merge() {
        let p: CreateSnapshotParams =
            serde_json::from_str(r#"{"snapshot_path":"s","mem_file_path":"m"}"#).unwrap();
        assert_eq!(p.snapshot_type, SnapshotType::Full);
        p.validate().unwrap();
        let p: CreateSnapshotParams = serde_json::from_str(
            r#"{"snapshot_type":"Diff","snapshot_path":"s","mem_file_path":"s"}"#,
        )
        .unwrap();
        assert!(p.validate().unwrap_err().contains("must differ"));
        let e = serde_json::from_str::<CreateSnapshotParams>(
            r#"{"snapshot_type":"diff","snapshot_path":"s","mem_file_path":"m"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown variant `diff`"), "{e}");

        let p: MergeDiffParams = serde_json::from_str(
            r#"{"base_mem_file_path":"b","diff_mem_file_path":"d","snapshot_path":"s"}"#,
        )
        .unwrap();
        p.validate().unwrap();
        let p: MergeDiffParams = serde_json::from_str(
            r#"{"base_mem_file_path":"b","diff_mem_file_path":"","snapshot_path":"s"}"#,
        )
        .unwrap();
        assert!(p.validate().unwrap_err().contains("diff_mem_file_path"));
    }
}
