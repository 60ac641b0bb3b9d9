//! Product defaults (`STATE/config.json`, all fields optional) and how the
//! default guest is found.
//!
//! The guest kernel and root filesystem of a new sandbox come from, in order:
//! the `--kernel` / `--rootfs` flags; the `VMM_KERNEL` / `VMM_ROOTFS`
//! environment variables; `kernel` / `rootfs` in `STATE/config.json`; the
//! newest artifacts built by `resources/build-kernel.sh` and
//! `resources/build-rootfs.sh` in `$VMM_CACHE` (default `~/.cache/vmm`):
//! `kernel-*/vmlinux` and `rootfs-*/rootfs.ext4`.
//!
//! Images: a named kernel and root filesystem pair kept in the state
//! directory as `STATE/images/NAME/vmlinux` and `STATE/images/NAME/rootfs.ext4`
//! (files or symlinks), chosen with `vmm use NAME --image IMAGE`. The image
//! `default` is the guest resolved as above, unless a directory of that name
//! exists.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::clock::parse_duration;
use super::error::{Error, Result};
use super::names;
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

/// The image `default` names when no directory of that name exists.
pub const DEFAULT_IMAGE: &str = "default";
/// The files of an image directory.
const IMAGE_KERNEL: &str = "vmlinux";
const IMAGE_ROOTFS: &str = "rootfs.ext4";

fn images_dir(store: &Store) -> PathBuf {
    store.root().join("images")
}

/// The images of the state directory (directories holding both files),
/// sorted; `default` is not listed unless it is a directory.
pub fn image_names(store: &Store) -> Result<Vec<String>> {
    let dir = images_dir(store);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listing", &dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", &dir, e))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        if names::validate("image", &name).is_ok()
            && path.join(IMAGE_KERNEL).is_file()
            && path.join(IMAGE_ROOTFS).is_file()
        {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// The kernel and root filesystem of image `name`: its directory under
/// `STATE/images`, or for `default` (without such a directory) the guest
/// resolved from the environment, config.json or the artifact cache.
pub fn image(store: &Store, cfg: &ProductConfig, name: &str) -> Result<(Resolved, Resolved)> {
    names::validate("image", name)?;
    let dir = images_dir(store).join(name);
    if dir.is_dir() {
        let part = |file: &str| -> Result<Resolved> {
            let path = dir.join(file);
            if path.is_file() {
                Ok(Resolved {
                    path,
                    source: "--image",
                })
            } else {
                Err(Error::Invalid(format!(
                    "image {name} is incomplete: {} does not exist",
                    path.display()
                )))
            }
        };
        return Ok((part(IMAGE_KERNEL)?, part(IMAGE_ROOTFS)?));
    }
    if name == DEFAULT_IMAGE {
        return default_guest(cfg);
    }
    let mut known = image_names(store)?;
    if !known.iter().any(|n| n == DEFAULT_IMAGE) {
        known.push(DEFAULT_IMAGE.to_string());
    }
    Err(Error::Invalid(format!(
        "no image named {name:?}; available: {} (an image is a directory {} holding {IMAGE_KERNEL} \
         and {IMAGE_ROOTFS})",
        known.join(", "),
        images_dir(store).join("NAME").display()
    )))
}

/// The default guest: kernel and root filesystem from the environment,
/// config.json or the artifact cache.
pub fn default_guest(cfg: &ProductConfig) -> Result<(Resolved, Resolved)> {
    Ok((
        default_kernel(None, cfg)?,
        resolve(
            "rootfs",
            None,
            "VMM_ROOTFS",
            cfg.rootfs.as_deref(),
            ("rootfs-", "rootfs.ext4"),
        )?,
    ))
}

/// The kernel: `flag`, else the environment, config.json, the cache.
pub fn default_kernel(flag: Option<&Path>, cfg: &ProductConfig) -> Result<Resolved> {
    resolve(
        "kernel",
        flag,
        "VMM_KERNEL",
        cfg.kernel.as_deref(),
        ("kernel-", "vmlinux"),
    )
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
    fn images() {
        let t = TempDir::new("images");
        let store = Store::open(&t.0).unwrap();
        let cfg = ProductConfig::default();
        assert!(image_names(&store).unwrap().is_empty());
        let small = t.0.join("images/small");
        std::fs::create_dir_all(&small).unwrap();
        std::fs::write(small.join("vmlinux"), "k").unwrap();
        // Incomplete: not listed, and a clear error.
        assert!(image_names(&store).unwrap().is_empty());
        let e = image(&store, &cfg, "small").unwrap_err().to_string();
        assert!(
            e.contains("image small is incomplete") && e.contains("rootfs.ext4"),
            "{e}"
        );
        std::fs::write(small.join("rootfs.ext4"), "r").unwrap();
        std::fs::create_dir_all(t.0.join("images/Not_Valid")).unwrap();
        assert_eq!(image_names(&store).unwrap(), ["small"]);
        let (k, r) = image(&store, &cfg, "small").unwrap();
        assert_eq!(
            (k.path, r.path),
            (small.join("vmlinux"), small.join("rootfs.ext4"))
        );
        let e = image(&store, &cfg, "big").unwrap_err().to_string();
        assert!(
            e.starts_with("no image named \"big\"; available: small, default ("),
            "{e}"
        );
        assert!(image(&store, &cfg, "../small").is_err());
        // `default` is the configured guest.
        let k = t.0.join("k");
        let r = t.0.join("r");
        std::fs::write(&k, "k").unwrap();
        std::fs::write(&r, "r").unwrap();
        let cfg = ProductConfig {
            kernel: Some(k.clone()),
            rootfs: Some(r.clone()),
            ..Default::default()
        };
        if std::env::var_os("VMM_KERNEL").is_none() && std::env::var_os("VMM_ROOTFS").is_none() {
            let (dk, dr) = image(&store, &cfg, DEFAULT_IMAGE).unwrap();
            assert_eq!((dk.path, dr.path), (k, r));
        }
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
