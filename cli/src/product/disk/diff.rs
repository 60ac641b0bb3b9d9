//! Diff disks: a diff snapshot stores only the fixed-size chunks of the disk
//! that differ from its parent snapshot's disk.
//!
//! A diff snapshot directory holds `disk`, a sparse file of the disk's size
//! with the changed chunks at their own offsets (holes elsewhere, and where a
//! changed chunk became all zeros), and `disk.map`, the list of changed
//! chunks with a CRC64 of each. A chain is a full disk (a full snapshot's
//! `disk`) and the diffs on top of it, oldest first; a chunk's content is the
//! newest diff's that lists it, else the base's.
//!
//! Saving compares the sandbox's disk (VM paused) with the parent chain chunk
//! by chunk; ranges that are holes on both sides are not read. The map is
//! written last, so a diff disk exists only once both files are complete.
//!
//! `disk.map` (little endian): magic `VMMDDIF1`, u32 format version, u32
//! chunk size, u64 disk size, u64 entry count, entries of (u64 chunk index,
//! u64 CRC64 of the chunk's bytes) in increasing index order, then a u64
//! CRC64 of everything before it.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::product::disk;
use crate::product::error::{Error, Result};

/// Bytes per chunk: small enough that a few changed guest blocks cost
/// little, large enough that the map of a big disk stays small.
pub const CHUNK_SIZE: u64 = 64 << 10;
/// The changed chunks, in a diff snapshot's directory.
pub const DISK_FILE: &str = "disk";
/// The chunk map, in a diff snapshot's directory.
pub const MAP_FILE: &str = "disk.map";

const MAGIC: &[u8; 8] = b"VMMDDIF1";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const ENTRY_LEN: usize = 16;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_ECMA_182);

/// Whether the snapshot in `dir` stores its disk as a diff.
pub fn is_diff(dir: &Path) -> bool {
    dir.join(MAP_FILE).is_file()
}

/// A disk as a base image and diff snapshot directories on top of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskChain {
    /// A full disk image.
    pub base: PathBuf,
    /// Directories holding `disk` and `disk.map`, oldest first.
    pub diffs: Vec<PathBuf>,
}

/// What a saved diff holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiffSummary {
    pub changed_chunks: u64,
    pub disk_size: u64,
}

/// The contents of `disk.map`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChunkMap {
    disk_size: u64,
    /// (chunk index, CRC64 of its bytes), strictly increasing indices.
    chunks: Vec<(u64, u64)>,
}

fn chunk_count(disk_size: u64) -> u64 {
    disk_size.div_ceil(CHUNK_SIZE)
}

/// The byte range of chunk `index` in a disk of `disk_size` bytes.
fn chunk_range(index: u64, disk_size: u64) -> (u64, u64) {
    let start = index.saturating_mul(CHUNK_SIZE);
    (start, start.saturating_add(CHUNK_SIZE).min(disk_size))
}

impl ChunkMap {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * ENTRY_LEN + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        // CHUNK_SIZE is a small constant; it fits.
        out.extend_from_slice(&(CHUNK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.disk_size.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for (index, crc) in &self.chunks {
            out.extend_from_slice(&index.to_le_bytes());
            out.extend_from_slice(&crc.to_le_bytes());
        }
        let crc = CRC64.checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses and validates a map read from `path`.
    fn decode(bytes: &[u8], path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Corrupt {
            what: "reading disk chunk map",
            path: path.to_path_buf(),
            reason,
        };
        let u32_at = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let u64_at = |at: usize| {
            bytes
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        if bytes.len() < HEADER_LEN + 8 {
            return Err(bad(format!("truncated: {} bytes", bytes.len())));
        }
        if &bytes[..8] != MAGIC {
            return Err(bad("not a disk chunk map (bad magic)".into()));
        }
        let count = u64_at(24).unwrap_or_default();
        let expected_len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(ENTRY_LEN))
            .and_then(|n| n.checked_add(HEADER_LEN + 8));
        if expected_len != Some(bytes.len()) {
            return Err(bad(format!(
                "truncated or overlong: {} bytes for {count} entries",
                bytes.len()
            )));
        }
        let body_len = bytes.len() - 8;
        let stored = u64_at(body_len).unwrap_or_default();
        let actual = CRC64.checksum(&bytes[..body_len]);
        if stored != actual {
            return Err(bad(format!(
                "checksum mismatch (stored {stored:#018x}, computed {actual:#018x})"
            )));
        }
        let version = u32_at(8).unwrap_or_default();
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}, this vmm reads {VERSION}"
            )));
        }
        let chunk_size = u32_at(12).unwrap_or_default();
        if u64::from(chunk_size) != CHUNK_SIZE {
            return Err(bad(format!(
                "chunk size {chunk_size}, this vmm uses {CHUNK_SIZE}"
            )));
        }
        let disk_size = u64_at(16).unwrap_or_default();
        let total = chunk_count(disk_size);
        let mut chunks = Vec::with_capacity(count as usize);
        for i in 0..count as usize {
            let at = HEADER_LEN + i * ENTRY_LEN;
            let (Some(index), Some(crc)) = (u64_at(at), u64_at(at + 8)) else {
                return Err(bad(format!("entry {i} cut short")));
            };
            if index >= total {
                return Err(bad(format!(
                    "entry {i}: chunk {index} is past the disk's {total} chunks"
                )));
            }
            if chunks.last().is_some_and(|&(prev, _)| prev >= index) {
                return Err(bad(format!("entry {i}: chunk {index} out of order")));
            }
            chunks.push((index, crc));
        }
        Ok(ChunkMap { disk_size, chunks })
    }

    fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
        Self::decode(&bytes, path)
    }

    fn crc_of(&self, index: u64) -> Option<u64> {
        self.chunks
            .binary_search_by_key(&index, |&(i, _)| i)
            .ok()
            .map(|at| self.chunks[at].1)
    }
}

/// An open image and where it holds data.
struct Image {
    file: File,
    path: PathBuf,
    len: u64,
    data: Vec<(u64, u64)>,
}

impl Image {
    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("reading", path, e))?
            .len();
        let data = disk::data_ranges(&file, len).map_err(|e| Error::io("mapping", path, e))?;
        Ok(Image {
            file,
            path: path.to_path_buf(),
            len,
            data,
        })
    }

    /// Whether any of `[start, end)` is data (not a hole).
    fn has_data(&self, start: u64, end: u64) -> bool {
        let i = self.data.partition_point(|&(_, e)| e <= start);
        self.data.get(i).is_some_and(|&(s, _)| s < end)
    }

    /// Fills `buf` from `off`; holes read as zeros without touching the file.
    fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        if !self.has_data(off, off + buf.len() as u64) {
            buf.fill(0);
            return Ok(());
        }
        self.file.read_exact_at(buf, off).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::Corrupt {
                    what: "reading disk image",
                    path: self.path.clone(),
                    reason: format!("truncated: ends before offset {}", off + buf.len() as u64),
                }
            } else {
                Error::io("reading", &self.path, e)
            }
        })
    }
}

/// A chain opened and checked: every diff matches the base's size.
struct OpenChain {
    base: Image,
    diffs: Vec<(Image, PathBuf, ChunkMap)>,
}

impl OpenChain {
    fn open(chain: &DiskChain) -> Result<Self> {
        let base = Image::open(&chain.base)?;
        let mut diffs = Vec::with_capacity(chain.diffs.len());
        for dir in &chain.diffs {
            let map_path = dir.join(MAP_FILE);
            let map = ChunkMap::read(&map_path)?;
            if map.disk_size != base.len {
                return Err(Error::Corrupt {
                    what: "reading disk chunk map",
                    path: map_path,
                    reason: format!(
                        "claims a {}-byte disk; its chain's base {} has {} bytes",
                        map.disk_size,
                        chain.base.display(),
                        base.len
                    ),
                });
            }
            let image = Image::open(&dir.join(DISK_FILE))?;
            if image.len != map.disk_size {
                return Err(Error::Corrupt {
                    what: "reading diff disk",
                    path: image.path,
                    reason: format!("{} bytes, its chunk map says {}", image.len, map.disk_size),
                });
            }
            diffs.push((image, map_path, map));
        }
        Ok(OpenChain { base, diffs })
    }

    fn len(&self) -> u64 {
        self.base.len
    }

    /// The image holding chunk `index` and the CRC a diff recorded for it.
    fn source(&self, index: u64) -> (&Image, Option<u64>) {
        for (image, _, map) in self.diffs.iter().rev() {
            if let Some(crc) = map.crc_of(index) {
                return (image, Some(crc));
            }
        }
        (&self.base, None)
    }

    fn has_data(&self, index: u64) -> bool {
        let (start, end) = chunk_range(index, self.len());
        self.source(index).0.has_data(start, end)
    }

    /// Chunk `index`'s bytes in the chain's disk, checked against its CRC.
    fn read_chunk(&self, index: u64, buf: &mut [u8]) -> Result<()> {
        let (start, _) = chunk_range(index, self.len());
        let (image, crc) = self.source(index);
        image.read(start, buf)?;
        if let Some(want) = crc {
            let got = CRC64.checksum(buf);
            if got != want {
                return Err(Error::Corrupt {
                    what: "reading diff disk",
                    path: image.path.clone(),
                    reason: format!("chunk {index} (offset {start}) fails its checksum"),
                });
            }
        }
        Ok(())
    }
}

/// A temporary sibling of `path`, unique to this process.
fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing", dir, e))
}

fn create_new(path: &Path) -> Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("removing", path, e)),
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io("creating", path, e))
}

/// Stores in `out_dir` the chunks of `current` that differ from `parent`'s
/// disk: `disk` then `disk.map`, each written to a temporary file, synced and
/// renamed. `out_dir` must not hold a diff disk yet.
pub fn save_diff(current: &Path, parent: &DiskChain, out_dir: &Path) -> Result<DiffSummary> {
    let chain = OpenChain::open(parent)?;
    let cur = Image::open(current)?;
    if cur.len != chain.len() {
        return Err(Error::Invalid(format!(
            "disk {} has {} bytes but its parent snapshot's disk has {}: \
             take a full snapshot",
            current.display(),
            cur.len,
            chain.len()
        )));
    }
    let disk_path = out_dir.join(DISK_FILE);
    let map_path = out_dir.join(MAP_FILE);
    let (disk_tmp, map_tmp) = (temp_path(&disk_path), temp_path(&map_path));
    let result = (|| {
        let out = create_new(&disk_tmp)?;
        out.set_len(cur.len)
            .map_err(|e| Error::io("sizing", &disk_tmp, e))?;
        let mut map = ChunkMap {
            disk_size: cur.len,
            chunks: Vec::new(),
        };
        let mut mine = vec![0u8; CHUNK_SIZE as usize];
        let mut theirs = vec![0u8; CHUNK_SIZE as usize];
        for index in 0..chunk_count(cur.len) {
            let (start, end) = chunk_range(index, cur.len);
            let n = (end - start) as usize;
            let (mine, theirs) = (&mut mine[..n], &mut theirs[..n]);
            if !cur.has_data(start, end) && !chain.has_data(index) {
                continue; // a hole on both sides
            }
            cur.read(start, mine)?;
            chain.read_chunk(index, theirs)?;
            if mine == theirs {
                continue;
            }
            if mine.iter().any(|&b| b != 0) {
                out.write_all_at(mine, start)
                    .map_err(|e| Error::io("writing", &disk_tmp, e))?;
            }
            map.chunks.push((index, CRC64.checksum(mine)));
        }
        out.sync_all()
            .map_err(|e| Error::io("syncing", &disk_tmp, e))?;
        let mut f = create_new(&map_tmp)?;
        f.write_all(&map.encode())
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io("writing", &map_tmp, e))?;
        std::fs::rename(&disk_tmp, &disk_path)
            .map_err(|e| Error::io("renaming to", &disk_path, e))?;
        std::fs::rename(&map_tmp, &map_path).map_err(|e| Error::io("renaming to", &map_path, e))?;
        sync_dir(out_dir)?;
        Ok(DiffSummary {
            changed_chunks: map.chunks.len() as u64,
            disk_size: cur.len,
        })
    })();
    if result.is_err() {
        for p in [&disk_tmp, &map_tmp] {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Makes chunk `[start, end)` of `f` zeros, as a hole where the filesystem
/// can punch one.
fn zero_range(f: &File, start: u64, end: u64) -> std::io::Result<()> {
    let (Ok(off), Ok(len)) = (
        libc::off_t::try_from(start),
        libc::off_t::try_from(end - start),
    ) else {
        return Err(std::io::Error::from_raw_os_error(libc::EOVERFLOW));
    };
    // SAFETY: fallocate on a descriptor we own; it touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    f.write_all_at(&vec![0u8; (end - start) as usize], start)
}

/// Writes `chain`'s disk to `dst` (replacing it atomically): a copy of the
/// base (reflink or sparse), then each changed chunk's newest version.
pub fn rebuild(chain: &DiskChain, dst: &Path) -> Result<()> {
    let open = OpenChain::open(chain)?;
    let tmp = temp_path(dst);
    let result = (|| {
        let _ = std::fs::remove_file(&tmp);
        disk::copy_file(&chain.base, &tmp)?;
        let out = OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(|e| Error::io("opening", &tmp, e))?;
        let mut changed: Vec<u64> = open
            .diffs
            .iter()
            .flat_map(|(_, _, m)| m.chunks.iter().map(|&(i, _)| i))
            .collect();
        changed.sort_unstable();
        changed.dedup();
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for index in changed {
            let (start, end) = chunk_range(index, open.len());
            let buf = &mut buf[..(end - start) as usize];
            open.read_chunk(index, buf)?;
            let written = if buf.iter().all(|&b| b == 0) {
                zero_range(&out, start, end)
            } else {
                out.write_all_at(buf, start)
            };
            written.map_err(|e| Error::io("writing", &tmp, e))?;
        }
        out.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
        std::fs::rename(&tmp, dst).map_err(|e| Error::io("renaming to", dst, e))?;
        if let Some(dir) = dst.parent().filter(|d| !d.as_os_str().is_empty()) {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::product::store::tests::TempDir;

    const MIB: u64 = 1 << 20;

    /// A sparse image of `len` bytes with `writes` (offset, bytes) applied.
    fn image(path: &Path, len: u64, writes: &[(u64, &[u8])]) {
        let f = File::create(path).unwrap();
        f.set_len(len).unwrap();
        for (off, bytes) in writes {
            f.write_all_at(bytes, *off).unwrap();
        }
        f.sync_all().unwrap();
    }

    fn write_at(path: &Path, off: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, off).unwrap();
    }

    fn map_of(dir: &Path) -> ChunkMap {
        ChunkMap::read(&dir.join(MAP_FILE)).unwrap()
    }

    fn indices(dir: &Path) -> Vec<u64> {
        map_of(dir).chunks.iter().map(|&(i, _)| i).collect()
    }

    fn snap_dir(t: &TempDir, name: &str) -> PathBuf {
        let d = t.0.join(name);
        std::fs::create_dir(&d).unwrap();
        d
    }

    #[test]
    fn identical_disks_give_an_empty_diff() {
        let t = TempDir::new("ddiff-same");
        let base = t.0.join("base");
        image(&base, 8 * MIB, &[(0, b"boot"), (3 * MIB, &[9u8; 70_000])]);
        let cur = t.0.join("cur");
        disk::copy_file(&base, &cur).unwrap();
        let d = snap_dir(&t, "d");
        let chain = DiskChain {
            base: base.clone(),
            diffs: vec![],
        };
        let s = save_diff(&cur, &chain, &d).unwrap();
        assert_eq!(
            s,
            DiffSummary {
                changed_chunks: 0,
                disk_size: 8 * MIB
            }
        );
        assert!(map_of(&d).chunks.is_empty());
        assert_eq!(disk::allocated_bytes(&d.join(DISK_FILE)), 0);
        let names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "temporary files left: {names:?}");
        assert!(is_diff(&d) && !is_diff(&t.0));
    }

    #[test]
    fn only_changed_chunks_are_stored() {
        let t = TempDir::new("ddiff-changed");
        let base = t.0.join("base");
        image(
            &base,
            16 * MIB,
            &[(0, &[1u8; 4096]), (5 * MIB, &[2u8; 4096])],
        );
        let cur = t.0.join("cur");
        disk::copy_file(&base, &cur).unwrap();
        write_at(&cur, 3 * CHUNK_SIZE + 10, b"x"); // inside chunk 3
        write_at(&cur, 9 * MIB - 1, b"yz"); // straddles chunks 143 and 144
        write_at(&cur, 5 * MIB, &[0u8; 4096]); // data zeroed: chunk 80
        let d = snap_dir(&t, "d");
        let chain = DiskChain {
            base: base.clone(),
            diffs: vec![],
        };
        let s = save_diff(&cur, &chain, &d).unwrap();
        assert_eq!(indices(&d), [3, 80, 143, 144]);
        assert_eq!(s.changed_chunks, 4);
        // Three non-zero chunks stored, the zeroed one is a hole.
        let stored = disk::allocated_bytes(&d.join(DISK_FILE));
        assert!(stored <= 3 * CHUNK_SIZE, "{stored}");

        let out = t.0.join("rebuilt");
        let with_diff = DiskChain {
            base,
            diffs: vec![d],
        };
        rebuild(&with_diff, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&cur).unwrap());
    }

    #[test]
    fn a_chain_of_two_diffs_rebuilds_the_exact_bytes_and_keeps_holes() {
        let t = TempDir::new("ddiff-chain");
        let len = 32 * MIB + 1234; // a partial last chunk
        let base = t.0.join("base");
        image(
            &base,
            len,
            &[
                (0, b"superblock"),
                (4 * MIB, &[5u8; 300_000]),
                (len - 3, b"end"),
            ],
        );
        let cur = t.0.join("cur");
        disk::copy_file(&base, &cur).unwrap();

        write_at(&cur, 100, b"first diff");
        write_at(&cur, 20 * MIB, &[7u8; 100_000]);
        let d1 = snap_dir(&t, "d1");
        save_diff(
            &cur,
            &DiskChain {
                base: base.clone(),
                diffs: vec![],
            },
            &d1,
        )
        .unwrap();
        let after_d1 = std::fs::read(&cur).unwrap();

        write_at(&cur, 100, b"second!!!!"); // chunk 0 again
        write_at(&cur, 4 * MIB, &[0u8; 300_000]); // data becomes zeros
        write_at(&cur, len - 3, b"END"); // the partial last chunk
        let d2 = snap_dir(&t, "d2");
        let parent = DiskChain {
            base: base.clone(),
            diffs: vec![d1.clone()],
        };
        save_diff(&cur, &parent, &d2).unwrap();
        let last = chunk_count(len) - 1;
        let d2_chunks = indices(&d2);
        assert_eq!(d2_chunks.first(), Some(&0));
        assert_eq!(d2_chunks.last(), Some(&last));
        assert!(
            !d2_chunks.contains(&(20 * MIB / CHUNK_SIZE)),
            "unchanged since d1"
        );

        let out = t.0.join("rebuilt");
        rebuild(&parent, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), after_d1);
        let full = DiskChain {
            base,
            diffs: vec![d1, d2],
        };
        rebuild(&full, &out).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), after_d1.len());
        assert_eq!(
            CRC64.checksum(&got),
            CRC64.checksum(&std::fs::read(&cur).unwrap())
        );
        // Holes stay holes: the zeroed range is no longer allocated, and the
        // whole image uses far less than its size (unless a reflink shares).
        let image = Image::open(&out).unwrap();
        assert!(!image.has_data(4 * MIB + CHUNK_SIZE, 4 * MIB + 4 * CHUNK_SIZE));
        assert!(
            disk::allocated_bytes(&out) < 2 * MIB,
            "{}",
            disk::allocated_bytes(&out)
        );
        let names: Vec<_> = std::fs::read_dir(&t.0).unwrap().collect();
        assert_eq!(names.len(), 5, "temporary files left behind");
    }

    /// A base, a current disk one chunk different, and its diff in `d`.
    fn one_diff(t: &TempDir) -> (DiskChain, PathBuf) {
        let base = t.0.join("base");
        image(&base, 4 * MIB, &[(0, b"base")]);
        let cur = t.0.join("cur");
        disk::copy_file(&base, &cur).unwrap();
        write_at(&cur, 2 * MIB, b"changed");
        let d = snap_dir(t, "d");
        save_diff(
            &cur,
            &DiskChain {
                base: base.clone(),
                diffs: vec![],
            },
            &d,
        )
        .unwrap();
        (
            DiskChain {
                base,
                diffs: vec![d],
            },
            t.0.join("out"),
        )
    }

    fn rebuild_err(chain: &DiskChain, out: &Path) -> String {
        let e = rebuild(chain, out).unwrap_err();
        assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
        assert!(!out.exists());
        e.to_string()
    }

    #[test]
    fn corrupt_maps_and_chunks_are_refused() {
        let t = TempDir::new("ddiff-corrupt");
        let (chain, out) = one_diff(&t);
        let map_path = chain.diffs[0].join(MAP_FILE);
        let good = std::fs::read(&map_path).unwrap();
        rebuild(&chain, &out).unwrap();
        std::fs::remove_file(&out).unwrap();

        // Truncated map.
        std::fs::write(&map_path, &good[..good.len() - 5]).unwrap();
        let e = rebuild_err(&chain, &out);
        assert!(e.contains("disk.map") && e.contains("truncated"), "{e}");
        std::fs::write(&map_path, &good[..10]).unwrap();
        assert!(rebuild_err(&chain, &out).contains("truncated"));
        // A flipped bit.
        let mut bad = good.clone();
        bad[HEADER_LEN + 3] ^= 1;
        std::fs::write(&map_path, &bad).unwrap();
        assert!(rebuild_err(&chain, &out).contains("checksum mismatch"));
        // Not a map.
        std::fs::write(&map_path, vec![b'x'; good.len()]).unwrap();
        assert!(rebuild_err(&chain, &out).contains("bad magic"));

        // A well-formed map claiming another disk size.
        let mut map = ChunkMap::decode(&good, &map_path).unwrap();
        map.disk_size += CHUNK_SIZE;
        std::fs::write(&map_path, map.encode()).unwrap();
        let e = rebuild_err(&chain, &out);
        assert!(
            e.contains("claims a") && e.contains(&chain.base.display().to_string()),
            "{e}"
        );
        // Entries past the end or out of order.
        map.disk_size -= CHUNK_SIZE;
        map.chunks = vec![(chunk_count(map.disk_size), 0)];
        std::fs::write(&map_path, map.encode()).unwrap();
        assert!(rebuild_err(&chain, &out).contains("past the disk"));
        map.chunks = vec![(5, 0), (5, 0)];
        std::fs::write(&map_path, map.encode()).unwrap();
        assert!(rebuild_err(&chain, &out).contains("out of order"));
        std::fs::write(&map_path, &good).unwrap();

        // A changed byte in a stored chunk.
        let chunks = chain.diffs[0].join(DISK_FILE);
        write_at(&chunks, 2 * MIB + 1, b"H");
        let e = rebuild_err(&chain, &out);
        assert!(
            e.contains("fails its checksum") && e.contains("chunk 32"),
            "{e}"
        );
        // A truncated chunk file.
        let f = OpenOptions::new().write(true).open(&chunks).unwrap();
        f.set_len(MIB).unwrap();
        let e = rebuild_err(&chain, &out);
        assert!(e.contains("bytes, its chunk map says"), "{e}");
        // A missing one.
        std::fs::remove_file(&chunks).unwrap();
        let e = rebuild(&chain, &out).unwrap_err();
        assert!(
            matches!(e, Error::Io { .. }) && e.to_string().contains("opening"),
            "{e}"
        );

        let names: Vec<_> = std::fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn a_resized_disk_cannot_be_diffed() {
        let t = TempDir::new("ddiff-size");
        let (chain, _) = one_diff(&t);
        let cur = t.0.join("cur");
        let f = OpenOptions::new().write(true).open(&cur).unwrap();
        f.set_len(8 * MIB).unwrap();
        let d2 = snap_dir(&t, "d2");
        let e = save_diff(&cur, &chain, &d2).unwrap_err().to_string();
        assert!(e.contains("take a full snapshot"), "{e}");
        assert_eq!(std::fs::read_dir(&d2).unwrap().count(), 0);
    }

    #[test]
    fn hole_lookup() {
        let t = TempDir::new("ddiff-holes");
        let p = t.0.join("img");
        image(&p, 4 * MIB, &[(MIB, &[1u8; 10])]);
        let img = Image::open(&p).unwrap();
        assert!(img.has_data(MIB, MIB + 1));
        assert!(img.has_data(0, 2 * MIB));
        let mut buf = vec![1u8; 100];
        img.read(3 * MIB, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        img.read(MIB, &mut buf).unwrap();
        assert_eq!(&buf[..11], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
    }
}
