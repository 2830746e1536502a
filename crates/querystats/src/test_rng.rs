//! A small deterministic generator (xorshift64) for the randomized tests: the same sequence on
//! every run, so a failing step can be replayed.

pub struct XorShift(u64);

impl XorShift {
    /// `seed` must not be 0.
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}
