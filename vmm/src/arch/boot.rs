//! Loading a Linux kernel (ELF vmlinux or bzImage), its initrd and command
//! line into guest memory, and the zero page (`boot_params`) with the e820
//! map that the 64-bit boot protocol hands the kernel.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use devices::GuestMemoryMmap;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{self, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Why the guest could not be prepared for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    KernelOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot load kernel {path}: {detail}")]
    KernelLoad { path: String, detail: String },
    #[error("cannot read initrd {path}: {source}")]
    InitrdRead {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooBig { path: String, size: u64, limit: u64 },
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("e820 map has more than {0} entries")]
    E820Overflow(usize),
    #[error("writing boot data to guest memory at {addr:#x}: {source}")]
    GuestWrite {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where to start the boot vCPU, and what the zero page must carry.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// Guest physical address of the 64-bit entry point.
    pub entry: u64,
    /// bzImage setup header to carry into the zero page (None for ELF).
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Loads a kernel image, detected by content: ELF vmlinux or bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = || path.display().to_string();
    let mut file = File::open(path).map_err(|source| BootError::KernelOpen {
        path: name(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    file.seek(SeekFrom::Start(0))
        .map_err(|source| BootError::KernelOpen {
            path: name(),
            source,
        })?;
    let load_err = |e: loader::Error| BootError::KernelLoad {
        path: name(),
        detail: e.to_string(),
    };
    if is_elf {
        let r = loader::Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        Ok(LoadedKernel {
            entry: r.kernel_load.raw_value(),
            setup_header: None,
        })
    } else {
        let r = loader::BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        Ok(LoadedKernel {
            entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
            setup_header: r.setup_header,
        })
    }
}

/// Guest address and size of a loaded initrd.
#[derive(Debug, Clone, Copy)]
pub struct LoadedInitrd {
    pub addr: u64,
    pub size: u64,
}

/// Copies the initrd to the top of low RAM (page aligned), where the kernel
/// looks for it and where it does not collide with the kernel image.
pub fn load_initrd(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedInitrd, BootError> {
    let name = || path.display().to_string();
    let data = std::fs::read(path).map_err(|source| BootError::InitrdRead {
        path: name(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.last_addr().raw_value() + 1)
        .unwrap_or(0);
    let limit = low_end.min(MMIO_GAP_START);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= HIMEM_START)
        .ok_or(BootError::InitrdTooBig {
            path: name(),
            size,
            limit,
        })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|source| BootError::GuestWrite { addr, source })?;
    Ok(LoadedInitrd { addr, size })
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if cmdline.bytes().any(|b| b == 0) {
        return Err(BootError::Cmdline("contains a NUL byte".into()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|source| BootError::GuestWrite {
            addr: CMDLINE_START,
            source,
        })
}

/// The e820 map: RAM below the EBDA, then every RAM region from 1 MiB up.
pub fn e820_map(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    let mut map = vec![(0, EBDA_START)];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start));
        }
    }
    map
}

/// Writes the zero page for the 64-bit boot protocol.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    initrd: Option<LoadedInitrd>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let map = e820_map(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::E820Overflow(params.e820_table.len()));
    }
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| BootError::GuestWrite {
            addr: ZERO_PAGE_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_anonymous;

    #[test]
    fn e820_covers_low_ram_and_high_memory() {
        let mem = create_anonymous(128).unwrap();
        assert_eq!(
            e820_map(&mem),
            vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]
        );
    }

    #[test]
    fn cmdline_limits_are_enforced() {
        let mem = create_anonymous(16).unwrap();
        load_cmdline(&mem, "console=ttyS0").unwrap();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            load_cmdline(&mem, &long),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            load_cmdline(&mem, "a\0b"),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let mem = create_anonymous(64).unwrap();
        let path = std::env::temp_dir().join(format!("vmm-initrd-{}", std::process::id()));
        std::fs::write(&path, vec![1u8; 10_000]).unwrap();
        let initrd = load_initrd(&mem, &path).unwrap();
        assert_eq!(initrd.addr % 4096, 0);
        assert!(initrd.addr + initrd.size <= 64 << 20);
        let mut first = [0u8; 1];
        mem.read_slice(&mut first, GuestAddress(initrd.addr))
            .unwrap();
        assert_eq!(first[0], 1);
        std::fs::write(&path, vec![1u8; 70 << 20]).unwrap();
        assert!(matches!(
            load_initrd(&mem, &path),
            Err(BootError::InitrdTooBig { .. })
        ));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let mem = create_anonymous(16).unwrap();
        let path = std::env::temp_dir().join(format!("vmm-badkernel-{}", std::process::id()));
        std::fs::write(&path, b"not a kernel at all").unwrap();
        let err = load_kernel(&mem, &path).unwrap_err();
        assert!(matches!(err, BootError::KernelLoad { .. }), "{err}");
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            load_kernel(&mem, Path::new("/nonexistent")),
            Err(BootError::KernelOpen { .. })
        ));
    }
}
