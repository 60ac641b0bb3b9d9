//! A small deterministic PRNG (xorshift64*) to pick guest pages: the page
//! choice must be reproducible from a seed, not cryptographic.

/// xorshift64* generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self((seed ^ 0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `count` distinct indices below `n` (all of them when count >= n),
    /// by a partial Fisher-Yates shuffle.
    pub fn sample_distinct(&mut self, n: u64, count: u64) -> Vec<u64> {
        let count = count.min(n);
        let mut all: Vec<u64> = (0..n).collect();
        for i in 0..count {
            let j = i + self.next_u64() % (n - i);
            all.swap(i as usize, j as usize);
        }
        all.truncate(count as usize);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_and_reproducible() {
        let a = Rng::new(7).sample_distinct(1000, 100);
        let b = Rng::new(7).sample_distinct(1000, 100);
        assert_eq!(a, b);
        let mut s = a.clone();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), 100);
        assert!(s.iter().all(|&x| x < 1000));
        assert_ne!(a, Rng::new(8).sample_distinct(1000, 100));
        assert_eq!(Rng::new(1).sample_distinct(5, 10).len(), 5);
    }
}
