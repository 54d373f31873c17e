//! The input generator: a seeded pseudo-random source (SplitMix64) and the
//! byte mutations applied to valid messages.
//!
//! Iteration `i` of a run with seed `s` draws from `Rng::for_iteration(s,
//! i)`, so any one input can be made again on its own (`fuzz --seed S
//! --only I TARGET`).

/// A small, fast, seeded pseudo-random generator (SplitMix64). Not for
/// cryptography; identical sequences for identical seeds on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator of iteration `iteration` of a run seeded `seed`.
    pub fn for_iteration(seed: u64, iteration: u64) -> Self {
        let mut r = Rng(seed ^ iteration.wrapping_mul(0xD134_2543_DE82_EF95));
        r.next_u64();
        r
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// A value for an integer field: mostly small or at a boundary, where
    /// decoders go wrong, sometimes anything.
    pub fn interesting(&mut self) -> u64 {
        const EDGES: [u64; 12] = [
            0,
            1,
            2,
            7,
            8,
            0x7f,
            0xff,
            0x1000,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            u64::MAX,
        ];
        match self.below(4) {
            0 => *self.pick(&EDGES),
            1 => self.below(64),
            2 => self
                .pick(&EDGES)
                .wrapping_add(self.below(3))
                .wrapping_sub(1),
            _ => self.next_u64(),
        }
    }

    /// Fewer than `max` random bytes.
    pub fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max) as usize;
        self.bytes(len)
    }

    /// `len` random bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// Apply 1 to 4 random mutations to `msg`: flip bits, overwrite bytes or
/// little-endian words with interesting values, truncate, extend, or
/// duplicate a range.
pub fn mutate(rng: &mut Rng, msg: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        match rng.below(6) {
            0 if !msg.is_empty() => {
                let i = rng.below(msg.len() as u64) as usize;
                msg[i] ^= 1 << rng.below(8);
            }
            1 if !msg.is_empty() => {
                let i = rng.below(msg.len() as u64) as usize;
                msg[i] = rng.next_u64() as u8;
            }
            2 if msg.len() >= 4 => {
                // An aligned field: most wire fields are 4 or 8 bytes.
                let width = if rng.chance(1, 2) { 4 } else { 8 }.min(msg.len());
                let slots = (msg.len() / width) as u64;
                let at = rng.below(slots) as usize * width;
                let v = rng.interesting().to_le_bytes();
                msg[at..at + width].copy_from_slice(&v[..width]);
            }
            3 => {
                let keep = rng.below(msg.len() as u64 + 1) as usize;
                msg.truncate(keep);
            }
            4 => {
                let n = rng.below(64) as usize;
                let extra = rng.bytes(n);
                msg.extend(extra);
            }
            _ if msg.len() >= 2 => {
                let a = rng.below(msg.len() as u64) as usize;
                let b = a + rng.below((msg.len() - a) as u64) as usize;
                let at = rng.below(msg.len() as u64) as usize;
                let piece = msg[a..b].to_vec();
                msg.splice(at..at, piece);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_and_iteration_give_the_same_input() {
        let draw = |s, i| {
            let mut r = Rng::for_iteration(s, i);
            let mut m = r.bytes(32);
            mutate(&mut r, &mut m);
            m
        };
        assert_eq!(draw(1, 5), draw(1, 5));
        assert_ne!(draw(1, 5), draw(1, 6));
        assert_ne!(draw(1, 5), draw(2, 5));
    }

    #[test]
    fn mutations_change_messages_and_never_panic() {
        let mut changed = 0;
        for i in 0..10_000 {
            let mut r = Rng::for_iteration(9, i);
            let len = r.below(100) as usize;
            let orig = r.bytes(len);
            let mut m = orig.clone();
            mutate(&mut r, &mut m);
            changed += (m != orig) as u32;
        }
        assert!(changed > 9_000, "{changed}");
    }
}
