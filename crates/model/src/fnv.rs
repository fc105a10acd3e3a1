//! FNV-1a, a fast hash for internal indexes of short strings (ids, keys). Not for
//! anything an attacker controls the volume of in a way that matters here: the inputs are a
//! directory's own ids, and the worst case of a collision is speed, never correctness.

use std::hash::{BuildHasherDefault, Hasher};

/// The FNV-1a hasher.
#[derive(Clone, Copy, Debug)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A `HashMap` with FNV.
pub type FnvMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<Fnv>>;
/// A `HashSet` with FNV.
pub type FnvSet<K> = std::collections::HashSet<K, BuildHasherDefault<Fnv>>;
