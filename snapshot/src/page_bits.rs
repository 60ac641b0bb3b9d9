//! Page bitmaps: one bit per guest page, 64 pages to a word. Used by the
//! live copy, its write tracker and the page server.

/// Sets `page`'s bit; pages past the end are ignored.
pub(crate) fn set(bits: &mut [u64], page: u64) {
    if let Some(word) = bits.get_mut((page / 64) as usize) {
        *word |= 1 << (page % 64);
    }
}

/// Whether `page`'s bit is set; pages past the end read as clear.
pub(crate) fn get(bits: &[u64], page: u64) -> bool {
    bits.get((page / 64) as usize)
        .is_some_and(|word| word & (1 << (page % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_then_get_and_out_of_range() {
        let mut bits = vec![0u64; 2];
        for p in [0, 63, 64, 127] {
            set(&mut bits, p);
        }
        set(&mut bits, 128); // past the end: ignored
        assert_eq!(bits, vec![1 | 1 << 63, 1 | 1 << 63]);
        assert!(get(&bits, 63) && get(&bits, 64) && !get(&bits, 1));
        assert!(!get(&bits, 128));
    }
}
