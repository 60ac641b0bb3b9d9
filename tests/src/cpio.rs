//! A writer for "newc" cpio archives, the format Linux unpacks into its initramfs. Per-test files
//! are appended to the nested host's base initramfs as one such archive.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use crate::error::{HarnessError, Result};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const TRAILER: &str = "TRAILER!!!";

/// Writes a newc cpio archive, creating parent directory entries as needed (the kernel's
/// unpacker does not create missing parents).
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    dirs: HashSet<String>,
}

/// Normalizes an archive path: no leading '/', no empty, '.' or '..' components.
fn normalize(path: &str) -> Result<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(HarnessError::Cpio {
                    detail: format!("path {path:?} contains '..'"),
                })
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(HarnessError::Cpio {
            detail: format!("empty path {path:?}"),
        });
    }
    Ok(parts.join("/"))
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive on `out`.
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            written: 0,
            // Inode numbers only need to be distinct within the archive; start high so they do
            // not look like the base archive's (hard links are matched per archive anyway).
            next_ino: 0x10_0000,
            dirs: HashSet::new(),
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad_to(&mut self, align: u64) -> io::Result<()> {
        let rem = self.written % align;
        if rem != 0 {
            let zeros = vec![0u8; (align - rem) as usize];
            self.put(&zeros)?;
        }
        Ok(())
    }

    fn header(&mut self, name: &str, mode: u32, size: u64) -> Result<()> {
        let size = u32::try_from(size).map_err(|_| HarnessError::Cpio {
            detail: format!("{name}: {size} bytes is too large for newc"),
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let namesize = name.len() + 1;
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            maj = 0,
            min = 0,
            rmaj = 0,
            rmin = 0,
            check = 0,
        );
        let io = |e| HarnessError::io("write cpio header for", name, e);
        self.put(hdr.as_bytes()).map_err(io)?;
        self.put(name.as_bytes()).map_err(io)?;
        self.put(&[0]).map_err(io)?;
        self.pad_to(4).map_err(io)
    }

    /// Emits directory entries for every missing parent of `name` (already normalized).
    fn parents(&mut self, name: &str) -> Result<()> {
        let mut end = 0;
        while let Some(pos) = name[end..].find('/') {
            let dir = name[..end + pos].to_string();
            end += pos + 1;
            if self.dirs.insert(dir.clone()) {
                self.header(&dir, S_IFDIR | 0o755, 0)?;
            }
        }
        Ok(())
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let name = normalize(path)?;
        self.parents(&name)?;
        if self.dirs.insert(name.clone()) {
            self.header(&name, S_IFDIR | (mode & 0o7777), 0)?;
        }
        Ok(())
    }

    /// Adds a regular file with the given content.
    pub fn file_bytes(&mut self, path: &str, data: &[u8], mode: u32) -> Result<()> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.header(&name, S_IFREG | (mode & 0o7777), data.len() as u64)?;
        let io = |e| HarnessError::io("write cpio data for", &name, e);
        self.put(data).map_err(io)?;
        self.pad_to(4).map_err(io)
    }

    /// Adds a regular file whose content is copied (streamed) from `src`, following symlinks.
    pub fn file_from(&mut self, path: &str, src: &Path, mode: u32) -> Result<()> {
        let name = normalize(path)?;
        let mut file = File::open(src).map_err(|e| HarnessError::io("open", src, e))?;
        let size = file
            .metadata()
            .map_err(|e| HarnessError::io("stat", src, e))?
            .len();
        self.parents(&name)?;
        self.header(&name, S_IFREG | (mode & 0o7777), size)?;
        let copied = io::copy(&mut file, &mut self.out)
            .map_err(|e| HarnessError::io("copy into cpio", src, e))?;
        self.written += copied;
        if copied != size {
            return Err(HarnessError::Cpio {
                detail: format!(
                    "{} changed while archiving ({size} bytes expected, {copied} copied)",
                    src.display()
                ),
            });
        }
        self.pad_to(4)
            .map_err(|e| HarnessError::io("write cpio data for", &name, e))
    }

    /// Adds a symbolic link `path` -> `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let name = normalize(path)?;
        self.parents(&name)?;
        self.header(&name, S_IFLNK | 0o777, target.len() as u64)?;
        let io = |e| HarnessError::io("write cpio data for", &name, e);
        self.put(target.as_bytes()).map_err(io)?;
        self.pad_to(4).map_err(io)
    }

    /// Writes the trailer, pads the archive to 512 bytes (so further archives can follow) and
    /// returns the output.
    pub fn finish(mut self) -> Result<W> {
        self.header(TRAILER, 0, 0)?;
        let io = |e| HarnessError::io("finish cpio", TRAILER, e);
        self.pad_to(512).map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn normalize_rejects_escapes() {
        assert_eq!(normalize("/a//b/./c").unwrap(), "a/b/c");
        assert!(normalize("/a/../b").is_err());
        assert!(normalize("/").is_err());
    }

    #[test]
    fn gnu_cpio_reads_our_archive() {
        let mut w = CpioWriter::new(Vec::new());
        w.file_bytes("/test/run.sh", b"echo hi\n", 0o755).unwrap();
        w.symlink("/bin/x", "/test/run.sh").unwrap();
        w.dir("/empty/dir", 0o700).unwrap();
        let data = w.finish().unwrap();
        assert_eq!(data.len() % 512, 0);

        let dir = std::env::temp_dir().join(format!("vmm-tests-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let archive = dir.join("a.cpio");
        std::fs::write(&archive, &data).unwrap();
        let out = Command::new("cpio")
            .args(["-i", "-t", "-v", "--quiet", "-F"])
            .arg(&archive)
            .output()
            .expect("cpio is installed (resources/install-deps.sh)");
        assert!(out.status.success(), "{out:?}");
        let listing = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = listing
            .lines()
            .map(|l| l.split_whitespace().nth(8).unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            ["test", "test/run.sh", "bin", "bin/x", "empty", "empty/dir"]
        );
        assert!(listing.contains("-rwxr-xr-x"), "{listing}");
        assert!(listing.contains("drwx------"), "{listing}");
        assert!(listing.contains("bin/x -> /test/run.sh"), "{listing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
