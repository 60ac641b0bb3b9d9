//! Product defaults (`STATE/config.json`, all fields optional) and how the
//! default guest is found.
//!
//! The guest kernel and root filesystem of a new sandbox come from, in order:
//! the `--kernel` / `--rootfs` flags; the `VMM_KERNEL` / `VMM_ROOTFS`
//! environment variables; `kernel` / `rootfs` in `STATE/config.json`; the
//! newest artifacts built by `resources/build-kernel.sh` and
//! `resources/build-rootfs.sh` in `$VMM_CACHE` (default `~/.cache/vmm`):
//! `kernel-*/vmlinux` and `rootfs-*/rootfs.ext4`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::clock::parse_duration;
use super::error::{Error, Result};
use super::store::{read_json, Store};

/// Kernel command line of sandboxes: quiet, because a serial console is slow.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet";

/// `STATE/config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductConfig {
    pub kernel: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub vcpus: Option<u8>,
    pub mem_mib: Option<u64>,
    pub cmdline: Option<String>,
    /// Expiry of new snapshots when `--expires-in` is not given (`7d`).
    pub default_expires_in: Option<String>,
    /// Seconds to wait for a new sandbox's guest agent.
    pub boot_timeout_secs: Option<u64>,
}

impl ProductConfig {
    pub fn load(store: &Store) -> Result<Self> {
        Ok(read_json(&store.config_path())?.unwrap_or_default())
    }

    pub fn default_expiry(&self) -> Result<Option<Duration>> {
        self.default_expires_in
            .as_deref()
            .map(parse_duration)
            .transpose()
    }

    pub fn boot_timeout(&self) -> Duration {
        Duration::from_secs(self.boot_timeout_secs.unwrap_or(120))
    }
}

/// Which file a guest artifact is and where that choice came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    pub source: &'static str,
}

/// Finds one artifact: flag, environment variable, config, newest in cache.
pub fn resolve(
    what: &str,
    flag: Option<&Path>,
    env_var: &str,
    configured: Option<&Path>,
    cache_pattern: (&str, &str),
) -> Result<Resolved> {
    let found = |path: PathBuf, source: &'static str| -> Result<Resolved> {
        if path.is_file() {
            Ok(Resolved { path, source })
        } else {
            Err(Error::Invalid(format!(
                "guest {what} {} (from {source}) does not exist",
                path.display()
            )))
        }
    };
    if let Some(p) = flag {
        let label = if what == "kernel" {
            "--kernel"
        } else {
            "--rootfs"
        };
        return found(absolute(p)?, label);
    }
    if let Some(p) = std::env::var_os(env_var).filter(|v| !v.is_empty()) {
        return found(absolute(Path::new(&p))?, "the environment");
    }
    if let Some(p) = configured {
        return found(p.to_path_buf(), "config.json");
    }
    newest_in_cache(cache_pattern)
        .map(|path| Resolved {
            path,
            source: "the artifact cache",
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "no guest {what}: give --{what}, set {env_var}, put \"{what}\" in the state \
                 directory's config.json, or build one with resources/build-{}.sh",
                if what == "kernel" { "kernel" } else { "rootfs" }
            ))
        })
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    std::env::current_dir()
        .map(|d| d.join(p))
        .map_err(|e| Error::io("resolving", p, e))
}

/// The artifact cache of the resources/ scripts.
fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VMM_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("vmm")
}

/// The newest `DIR_PREFIX*/FILE` in the cache, by modification time.
fn newest_in_cache((prefix, file): (&str, &str)) -> Option<PathBuf> {
    let entries = std::fs::read_dir(cache_dir()).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join(file))
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((m.modified().ok()?, p))
        })
        .max()
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::super::store::tests::TempDir;
    use super::*;

    #[test]
    fn resolution_order() {
        let t = TempDir::new("config");
        let k1 = t.0.join("k1");
        let k2 = t.0.join("k2");
        std::fs::write(&k1, "k").unwrap();
        std::fs::write(&k2, "k").unwrap();
        let env = "VMM_TEST_UNSET_VARIABLE_FOR_RESOLVE";
        let r = resolve("kernel", Some(&k1), env, Some(&k2), ("x-", "y")).unwrap();
        assert_eq!(
            r,
            Resolved {
                path: k1.clone(),
                source: "--kernel"
            }
        );
        let r = resolve("kernel", None, env, Some(&k2), ("x-", "y")).unwrap();
        assert_eq!(r.source, "config.json");
        let e = resolve("rootfs", Some(&t.0.join("nope")), env, None, ("x-", "y"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("guest rootfs") && e.contains("(from --rootfs) does not exist"),
            "{e}"
        );
    }

    #[test]
    fn config_fields() {
        let c: ProductConfig =
            serde_json::from_str(r#"{"vcpus":2,"default_expires_in":"2h","boot_timeout_secs":5}"#)
                .unwrap();
        assert_eq!(c.default_expiry().unwrap(), Some(Duration::from_secs(7200)));
        assert_eq!(c.boot_timeout(), Duration::from_secs(5));
        assert!(serde_json::from_str::<ProductConfig>(r#"{"vcpu":2}"#).is_err());
    }
}
