//! Where each guest region lives in a memory file.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::MemoryError;

/// One guest region's place in guest physical memory and in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionLayout {
    /// Guest physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the first byte in the memory file.
    pub file_offset: u64,
}

/// The regions of a memory file, in guest memory order, packed back to back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The regions; region `i` starts where region `i - 1` ends.
    pub regions: Vec<RegionLayout>,
}

impl MemoryLayout {
    /// The layout of `mem`'s regions packed in iteration order.
    pub fn from_memory<M: GuestMemoryBackend>(mem: &M) -> Self {
        let mut file_offset = 0u64;
        let regions = mem
            .iter()
            .map(|region| {
                let layout = RegionLayout {
                    guest_addr: region.start_addr().0,
                    size: region.len(),
                    file_offset,
                };
                // Guest memory sizes are far below u64::MAX; saturate rather
                // than wrap so `validate` catches an impossible layout.
                file_offset = file_offset.saturating_add(region.len());
                layout
            })
            .collect();
        Self { regions }
    }

    /// Length of the memory file: the end of the last region.
    pub fn total_size(&self) -> u64 {
        self.regions
            .last()
            .map_or(0, |r| r.file_offset.saturating_add(r.size))
    }

    /// Checks that regions are packed back to back without overflow, as
    /// written by [`MemoryLayout::from_memory`]. Use on layouts read from a file.
    pub fn validate(&self) -> Result<(), MemoryError> {
        let mut expected_offset = 0u64;
        let mut prev_guest_end = 0u64;
        for (index, r) in self.regions.iter().enumerate() {
            if r.file_offset != expected_offset {
                return Err(MemoryError::InvalidLayout {
                    index,
                    reason: "file offset is not the end of the previous region",
                });
            }
            expected_offset =
                r.file_offset
                    .checked_add(r.size)
                    .ok_or(MemoryError::InvalidLayout {
                        index,
                        reason: "file offset + size overflows",
                    })?;
            let guest_end = r
                .guest_addr
                .checked_add(r.size)
                .ok_or(MemoryError::InvalidLayout {
                    index,
                    reason: "guest address + size overflows",
                })?;
            if index > 0 && r.guest_addr < prev_guest_end {
                return Err(MemoryError::InvalidLayout {
                    index,
                    reason: "region overlaps or precedes the previous one",
                });
            }
            prev_guest_end = guest_end;
        }
        if i64::try_from(expected_offset).is_err() {
            return Err(MemoryError::InvalidLayout {
                index: self.regions.len().saturating_sub(1),
                reason: "memory file would exceed the largest file offset",
            });
        }
        Ok(())
    }

    /// Checks that `mem` has exactly this layout's regions, so a file written
    /// for one can be used with the other.
    pub fn check_matches<M: GuestMemoryBackend>(&self, mem: &M) -> Result<(), MemoryError> {
        let actual = Self::from_memory(mem);
        if actual.regions.len() != self.regions.len() {
            return Err(MemoryError::RegionCountMismatch {
                expected: self.regions.len(),
                found: actual.regions.len(),
            });
        }
        for (index, (expected, found)) in self.regions.iter().zip(&actual.regions).enumerate() {
            if expected != found {
                return Err(MemoryError::RegionMismatch {
                    index,
                    expected: *expected,
                    found: *found,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[test]
    fn layout_is_cumulative() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x3000),
        ])
        .unwrap();
        let layout = MemoryLayout::from_memory(&mem);
        assert_eq!(
            layout.regions,
            vec![
                RegionLayout {
                    guest_addr: 0,
                    size: 0x10000,
                    file_offset: 0
                },
                RegionLayout {
                    guest_addr: 0x100000,
                    size: 0x3000,
                    file_offset: 0x10000
                },
            ]
        );
        assert_eq!(layout.total_size(), 0x13000);
        layout.validate().unwrap();
        layout.check_matches(&mem).unwrap();
        let json = serde_json::to_string(&layout).unwrap();
        assert_eq!(serde_json::from_str::<MemoryLayout>(&json).unwrap(), layout);
    }

    #[test]
    fn mismatches_are_detected() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut layout = MemoryLayout::from_memory(&mem);
        layout.regions[0].size = 0x20000;
        assert!(matches!(
            layout.check_matches(&mem),
            Err(MemoryError::RegionMismatch { index: 0, .. })
        ));
        layout.regions.push(layout.regions[0]);
        assert!(matches!(
            layout.check_matches(&mem),
            Err(MemoryError::RegionCountMismatch {
                expected: 2,
                found: 1
            })
        ));
        assert!(matches!(
            layout.validate(),
            Err(MemoryError::InvalidLayout { index: 1, .. })
        ));
        let huge = MemoryLayout {
            regions: vec![RegionLayout {
                guest_addr: 0,
                size: u64::MAX,
                file_offset: 0,
            }],
        };
        assert!(huge.validate().is_err());
    }
}
