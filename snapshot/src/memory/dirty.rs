//! Which guest pages changed since the last snapshot.

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{pages_in, MemoryLayout, PAGE_SIZE};

/// Most pages, all regions together, a bitmap accepts from untrusted input:
/// 1 TiB of guest memory (the largest guest the vmm builds), a 32 MiB
/// bitmap, so a damaged state file cannot make us allocate without bound.
const MAX_REGION_PAGES: u64 = 1 << 28;

/// Why a dirty bitmap was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirtyBitmapError {
    /// The bitmap and the memory have a different number of regions.
    #[error("dirty bitmap has {found} regions, memory has {expected}")]
    RegionCount {
        /// Regions in the memory.
        expected: usize,
        /// Regions in the bitmap.
        found: usize,
    },
    /// A region's page count does not match the memory.
    #[error("dirty bitmap region {region} covers {found} pages, memory region has {expected}")]
    RegionPages {
        /// Region index.
        region: usize,
        /// Pages in the memory region.
        expected: u64,
        /// Pages in the bitmap region.
        found: u64,
    },
    /// A raw dirty log has the wrong number of 64-bit words.
    #[error("dirty log for region {region} has {found} words, expected {expected}")]
    WordCount {
        /// Region index.
        region: usize,
        /// Words needed for the region's pages.
        expected: usize,
        /// Words given.
        found: usize,
    },
    /// A region index past the end.
    #[error("dirty bitmap has no region {region} (it has {count})")]
    NoSuchRegion {
        /// Region index asked for.
        region: usize,
        /// Regions present.
        count: usize,
    },
    /// A page index past the end of its region.
    #[error("page {page} is outside dirty bitmap region {region} of {pages} pages")]
    PageOutOfRange {
        /// Region index.
        region: usize,
        /// Page index.
        page: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// A serialized run reaches past the end of its region.
    #[error("dirty run {start}+{len} is outside region {region} of {pages} pages")]
    RunOutOfRange {
        /// Region index.
        region: usize,
        /// First page of the run.
        start: u64,
        /// Pages in the run.
        len: u64,
        /// Pages in the region.
        pages: u64,
    },
    /// Regions larger, together, than any guest we support.
    #[error(
        "dirty bitmap regions up to {region} have {pages} pages, more than the supported {max}"
    )]
    TooLarge {
        /// Region index.
        region: usize,
        /// Pages claimed.
        pages: u64,
        /// Largest accepted.
        max: u64,
    },
}

/// One bit per 4 KiB page per region, in KVM's dirty-log layout: bit `i` of
/// word `w` is page `w * 64 + i` of the region.
///
/// Serialized compactly as runs of dirty pages, so it can live in the state
/// file next to the diff it describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "BitmapRepr", into = "BitmapRepr")]
pub struct DirtyBitmap {
    regions: Vec<RegionBits>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RegionBits {
    pages: u64,
    words: Vec<u64>,
}

impl RegionBits {
    fn clean(pages: u64) -> Self {
        Self {
            pages,
            words: vec![0; words_for(pages)],
        }
    }
}

fn words_for(pages: u64) -> usize {
    // Bounded by MAX_REGION_PAGES / 64 or by a real mapping's size.
    pages.div_ceil(64) as usize
}

/// Mask of the bits of the last word that stand for real pages.
fn last_word_mask(pages: u64) -> u64 {
    match pages % 64 {
        0 => u64::MAX,
        rem => (1u64 << rem) - 1,
    }
}

impl DirtyBitmap {
    /// A bitmap with no dirty page, shaped like `layout`.
    pub fn clean(layout: &MemoryLayout) -> Self {
        Self {
            regions: layout
                .regions
                .iter()
                .map(|r| RegionBits::clean(pages_in(r.size)))
                .collect(),
        }
    }

    /// A bitmap with no dirty page, shaped like `mem`.
    pub fn clean_for<M: GuestMemoryBackend>(mem: &M) -> Self {
        Self::clean(&MemoryLayout::from_memory(mem))
    }

    /// A bitmap with every page dirty, shaped like `layout`.
    pub fn all_dirty(layout: &MemoryLayout) -> Self {
        let mut bitmap = Self::clean(layout);
        for r in &mut bitmap.regions {
            r.words.fill(u64::MAX);
            if let Some(last) = r.words.last_mut() {
                *last &= last_word_mask(r.pages);
            }
        }
        bitmap
    }

    /// Builds a bitmap from raw per-region logs such as KVM's
    /// `KVM_GET_DIRTY_LOG` output; bits past a region's end are ignored.
    pub fn from_words(
        layout: &MemoryLayout,
        logs: Vec<Vec<u64>>,
    ) -> Result<Self, DirtyBitmapError> {
        if logs.len() != layout.regions.len() {
            return Err(DirtyBitmapError::RegionCount {
                expected: layout.regions.len(),
                found: logs.len(),
            });
        }
        let regions = layout
            .regions
            .iter()
            .zip(logs)
            .enumerate()
            .map(|(region, (r, mut words))| {
                let pages = pages_in(r.size);
                if words.len() != words_for(pages) {
                    return Err(DirtyBitmapError::WordCount {
                        region,
                        expected: words_for(pages),
                        found: words.len(),
                    });
                }
                if let Some(last) = words.last_mut() {
                    *last &= last_word_mask(pages);
                }
                Ok(RegionBits { pages, words })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { regions })
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Number of pages region `region` covers (0 if there is no such region).
    pub fn region_pages(&self, region: usize) -> u64 {
        self.regions.get(region).map_or(0, |r| r.pages)
    }

    /// The raw words of one region (empty if there is no such region).
    pub fn region_words(&self, region: usize) -> &[u64] {
        self.regions.get(region).map_or(&[], |r| &r.words)
    }

    fn region_mut(&mut self, region: usize) -> Result<&mut RegionBits, DirtyBitmapError> {
        let count = self.regions.len();
        self.regions
            .get_mut(region)
            .ok_or(DirtyBitmapError::NoSuchRegion { region, count })
    }

    /// Marks one page dirty.
    pub fn set_page(&mut self, region: usize, page: u64) -> Result<(), DirtyBitmapError> {
        let r = self.region_mut(region)?;
        if page >= r.pages {
            return Err(DirtyBitmapError::PageOutOfRange {
                region,
                page,
                pages: r.pages,
            });
        }
        r.words[(page / 64) as usize] |= 1 << (page % 64);
        Ok(())
    }

    /// Whether a page is dirty (false outside the bitmap).
    pub fn is_dirty(&self, region: usize, page: u64) -> bool {
        self.regions.get(region).is_some_and(|r| {
            page < r.pages && r.words[(page / 64) as usize] & (1 << (page % 64)) != 0
        })
    }

    /// Adds every dirty page of `other`, which must have the same shape.
    pub fn or_with(&mut self, other: &DirtyBitmap) -> Result<(), DirtyBitmapError> {
        self.check_same_shape(other)?;
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.words.iter_mut().zip(&theirs.words) {
                *a |= *b;
            }
        }
        Ok(())
    }

    /// Adds one region's raw log (e.g. straight from `KVM_GET_DIRTY_LOG`).
    pub fn or_region_words(
        &mut self,
        region: usize,
        words: &[u64],
    ) -> Result<(), DirtyBitmapError> {
        let r = self.region_mut(region)?;
        if words.len() != r.words.len() {
            return Err(DirtyBitmapError::WordCount {
                region,
                expected: r.words.len(),
                found: words.len(),
            });
        }
        for (a, b) in r.words.iter_mut().zip(words) {
            *a |= *b;
        }
        if let Some(last) = r.words.last_mut() {
            *last &= last_word_mask(r.pages);
        }
        Ok(())
    }

    /// Adds the pages the VMM itself wrote, as recorded by the regions'
    /// vm-memory bitmaps (e.g. `AtomicBitmap`): KVM's log misses those.
    pub fn or_with_memory_bitmaps<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
    ) -> Result<(), DirtyBitmapError> {
        self.check_layout(&MemoryLayout::from_memory(mem))?;
        for (bits, region) in self.regions.iter_mut().zip(mem.iter()) {
            let bitmap = region.bitmap();
            for page in 0..bits.pages {
                // Within the region, so the offset fits in usize.
                if bitmap.dirty_at((page * PAGE_SIZE) as usize) {
                    bits.words[(page / 64) as usize] |= 1 << (page % 64);
                }
            }
        }
        Ok(())
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether no page is dirty.
    pub fn is_clean(&self) -> bool {
        self.regions.iter().all(|r| r.words.iter().all(|&w| w == 0))
    }

    /// Runs of consecutive dirty pages of one region, as `(first page, pages)`.
    pub fn runs(&self, region: usize) -> DirtyRuns<'_> {
        let (words, pages) = self
            .regions
            .get(region)
            .map_or((&[][..], 0), |r| (&r.words[..], r.pages));
        DirtyRuns {
            words,
            pages,
            pos: 0,
            max_len: u64::MAX,
        }
    }

    /// Checks that the bitmap has one region per layout region, each with the
    /// right number of pages.
    pub fn check_layout(&self, layout: &MemoryLayout) -> Result<(), DirtyBitmapError> {
        if self.regions.len() != layout.regions.len() {
            return Err(DirtyBitmapError::RegionCount {
                expected: layout.regions.len(),
                found: self.regions.len(),
            });
        }
        for (region, (bits, r)) in self.regions.iter().zip(&layout.regions).enumerate() {
            if bits.pages != pages_in(r.size) {
                return Err(DirtyBitmapError::RegionPages {
                    region,
                    expected: pages_in(r.size),
                    found: bits.pages,
                });
            }
        }
        Ok(())
    }

    fn check_same_shape(&self, other: &DirtyBitmap) -> Result<(), DirtyBitmapError> {
        if self.regions.len() != other.regions.len() {
            return Err(DirtyBitmapError::RegionCount {
                expected: self.regions.len(),
                found: other.regions.len(),
            });
        }
        for (region, (a, b)) in self.regions.iter().zip(&other.regions).enumerate() {
            if a.pages != b.pages {
                return Err(DirtyBitmapError::RegionPages {
                    region,
                    expected: a.pages,
                    found: b.pages,
                });
            }
        }
        Ok(())
    }
}

/// Iterator over runs of dirty pages in one region; see [`DirtyBitmap::runs`].
#[derive(Clone, Debug)]
pub struct DirtyRuns<'a> {
    words: &'a [u64],
    pages: u64,
    pos: u64,
    max_len: u64,
}

impl DirtyRuns<'_> {
    /// Splits runs longer than `max_len` pages (at least 1).
    pub fn max_len(mut self, max_len: u64) -> Self {
        self.max_len = max_len.max(1);
        self
    }

    /// First page at or after `from` whose bit equals `dirty`, or `pages`.
    fn find_bit(&self, from: u64, dirty: bool) -> u64 {
        let flip = if dirty { 0 } else { u64::MAX };
        let mut w = (from / 64) as usize;
        let Some(&first) = self.words.get(w) else {
            return self.pages;
        };
        let mut bits = (first ^ flip) & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return page.min(self.pages);
            }
            w += 1;
            match self.words.get(w) {
                Some(&word) => bits = word ^ flip,
                None => return self.pages,
            }
        }
    }
}

impl Iterator for DirtyRuns<'_> {
    type Item = (u64, u64);

    fn next(&mut self) -> Option<(u64, u64)> {
        if self.pos >= self.pages {
            return None;
        }
        let start = self.find_bit(self.pos, true);
        if start >= self.pages {
            self.pos = self.pages;
            return None;
        }
        let end = self
            .find_bit(start, false)
            .min(start.saturating_add(self.max_len));
        self.pos = end;
        Some((start, end - start))
    }
}

/// Serialized form: per region, its page count and runs `[first, len]`.
#[derive(Serialize, Deserialize)]
struct BitmapRepr {
    regions: Vec<RegionRepr>,
}

#[derive(Serialize, Deserialize)]
struct RegionRepr {
    pages: u64,
    runs: Vec<(u64, u64)>,
}

impl From<DirtyBitmap> for BitmapRepr {
    fn from(bitmap: DirtyBitmap) -> Self {
        let regions = (0..bitmap.regions.len())
            .map(|i| RegionRepr {
                pages: bitmap.regions[i].pages,
                runs: bitmap.runs(i).collect(),
            })
            .collect();
        Self { regions }
    }
}

impl TryFrom<BitmapRepr> for DirtyBitmap {
    type Error = DirtyBitmapError;

    fn try_from(repr: BitmapRepr) -> Result<Self, DirtyBitmapError> {
        let mut total = 0u64;
        let regions = repr
            .regions
            .into_iter()
            .enumerate()
            .map(|(region, r)| {
                total = total.saturating_add(r.pages);
                if total > MAX_REGION_PAGES {
                    return Err(DirtyBitmapError::TooLarge {
                        region,
                        pages: total,
                        max: MAX_REGION_PAGES,
                    });
                }
                let mut bits = RegionBits::clean(r.pages);
                for (start, len) in r.runs {
                    let end = start.checked_add(len).filter(|&end| end <= r.pages).ok_or(
                        DirtyBitmapError::RunOutOfRange {
                            region,
                            start,
                            len,
                            pages: r.pages,
                        },
                    )?;
                    set_range(&mut bits.words, start, end);
                }
                Ok(bits)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { regions })
    }
}

/// Sets bits `start..end` (already checked to be in range).
fn set_range(words: &mut [u64], start: u64, end: u64) {
    let mut page = start;
    while page < end {
        let w = (page / 64) as usize;
        let bit = page % 64;
        let n = (64 - bit).min(end - page);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        words[w] |= mask;
        page += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::RegionLayout;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    fn layout(sizes: &[u64]) -> MemoryLayout {
        let mut off = 0;
        MemoryLayout {
            regions: sizes
                .iter()
                .map(|&size| {
                    let r = RegionLayout {
                        guest_addr: off,
                        size,
                        file_offset: off,
                    };
                    off += size;
                    r
                })
                .collect(),
        }
    }

    #[test]
    fn set_count_runs() {
        let l = layout(&[200 * PAGE_SIZE, 3 * PAGE_SIZE + 1]);
        let mut b = DirtyBitmap::clean(&l);
        assert_eq!(b.region_pages(1), 4);
        for p in [0, 1, 2, 63, 64, 65, 130, 199] {
            b.set_page(0, p).unwrap();
        }
        b.set_page(1, 3).unwrap();
        assert_eq!(b.count(), 9);
        assert!(b.is_dirty(0, 64) && !b.is_dirty(0, 66) && !b.is_dirty(5, 0));
        assert_eq!(
            b.runs(0).collect::<Vec<_>>(),
            vec![(0, 3), (63, 3), (130, 1), (199, 1)]
        );
        assert_eq!(
            b.runs(0).max_len(2).collect::<Vec<_>>()[..3],
            [(0, 2), (2, 1), (63, 2)]
        );
        assert_eq!(b.runs(1).collect::<Vec<_>>(), vec![(3, 1)]);
        assert!(matches!(
            b.set_page(1, 4),
            Err(DirtyBitmapError::PageOutOfRange { .. })
        ));
        assert!(matches!(
            b.set_page(2, 0),
            Err(DirtyBitmapError::NoSuchRegion { .. })
        ));
    }

    #[test]
    fn all_dirty_covers_exactly_the_pages() {
        let l = layout(&[130 * PAGE_SIZE]);
        let b = DirtyBitmap::all_dirty(&l);
        assert_eq!(b.count(), 130);
        assert_eq!(b.runs(0).collect::<Vec<_>>(), vec![(0, 130)]);
    }

    #[test]
    fn from_words_and_or() {
        let l = layout(&[100 * PAGE_SIZE]);
        let mut kvm = DirtyBitmap::from_words(&l, vec![vec![0b101, u64::MAX]]).unwrap();
        // Bits past page 100 are dropped.
        assert_eq!(kvm.count(), 2 + 36);
        let mut vmm = DirtyBitmap::clean(&l);
        vmm.set_page(0, 1).unwrap();
        kvm.or_with(&vmm).unwrap();
        assert_eq!(kvm.runs(0).next(), Some((0, 3)));
        kvm.or_region_words(0, &[1 << 10, 0]).unwrap();
        assert!(kvm.is_dirty(0, 10));
        assert!(matches!(
            kvm.or_region_words(0, &[0]),
            Err(DirtyBitmapError::WordCount { .. })
        ));
        assert!(matches!(
            DirtyBitmap::from_words(&l, vec![vec![0]]),
            Err(DirtyBitmapError::WordCount { .. })
        ));
        let other = DirtyBitmap::clean(&layout(&[PAGE_SIZE]));
        assert!(matches!(
            kvm.or_with(&other),
            Err(DirtyBitmapError::RegionPages { .. })
        ));
        assert!(kvm.check_layout(&layout(&[PAGE_SIZE, PAGE_SIZE])).is_err());
    }

    #[test]
    fn or_with_vm_memory_bitmaps() {
        let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x4000),
        ])
        .unwrap();
        mem.write_obj(7u32, GuestAddress(0x3004)).unwrap();
        mem.write_slice(&[1u8; 5000], GuestAddress(0x101000))
            .unwrap();
        let mut b = DirtyBitmap::clean_for(&mem);
        b.or_with_memory_bitmaps(&mem).unwrap();
        assert_eq!(b.runs(0).collect::<Vec<_>>(), vec![(3, 1)]);
        assert_eq!(b.runs(1).collect::<Vec<_>>(), vec![(1, 2)]);
    }

    #[test]
    fn serde_runs_round_trip_and_validation() {
        let l = layout(&[1000 * PAGE_SIZE, 10 * PAGE_SIZE]);
        let mut b = DirtyBitmap::clean(&l);
        for p in (10..300).chain([500, 999]) {
            b.set_page(0, p).unwrap();
        }
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(
            json,
            r#"{"regions":[{"pages":1000,"runs":[[10,290],[500,1],[999,1]]},{"pages":10,"runs":[]}]}"#
        );
        let back: DirtyBitmap = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);

        let bad = r#"{"regions":[{"pages":10,"runs":[[5,6]]}]}"#;
        assert!(serde_json::from_str::<DirtyBitmap>(bad).is_err());
        let overflow = r#"{"regions":[{"pages":10,"runs":[[18446744073709551615,2]]}]}"#;
        assert!(serde_json::from_str::<DirtyBitmap>(overflow).is_err());
        let huge = r#"{"regions":[{"pages":18446744073709551615,"runs":[]}]}"#;
        let err = serde_json::from_str::<DirtyBitmap>(huge).unwrap_err();
        assert!(err.to_string().contains("more than the supported"), "{err}");
        // Many regions each within the bound, too many together: refused
        // before most are allocated.
        let region = format!(r#"{{"pages":{},"runs":[]}}"#, MAX_REGION_PAGES / 2);
        let many = format!(r#"{{"regions":[{}]}}"#, vec![region; 1000].join(","));
        let err = serde_json::from_str::<DirtyBitmap>(&many).unwrap_err();
        assert!(err.to_string().contains("regions up to 2"), "{err}");
    }

    #[test]
    fn set_range_spans_words() {
        let mut words = vec![0u64; 3];
        set_range(&mut words, 60, 130);
        assert_eq!(words, vec![0xf << 60, u64::MAX, 0b11]);
    }
}
