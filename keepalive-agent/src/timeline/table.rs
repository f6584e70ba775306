//! The engine's table of tracked connections, sized for memory per connection.
//!
//! A `HashMap<u64, Conn>` costs every connection its bucket (key and value) times the table's
//! slack: buckets double and hold at most 7/8 of them, so just after a doubling each entry pays
//! about 2.3 buckets. Here the hash index holds only socket → position (16 bytes a bucket), and the
//! values sit densely in a vector that grows by an eighth at a time, so the worst case is about
//! 2.3 × 17 bytes of index plus 1.125 × the value's size.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use super::engine::SkHasher;

/// A value that knows the socket address (`sk`) it is stored under.
pub(super) trait Keyed {
    fn key(&self) -> u64;
}

/// Values by socket address; dense storage, no order (a removal moves the last value into the
/// hole).
pub(super) struct SkTable<T> {
    /// Socket → position in `values`.
    index: HashMap<u64, usize, BuildHasherDefault<SkHasher>>,
    values: Vec<T>,
}

impl<T: Keyed> SkTable<T> {
    pub fn new() -> Self {
        SkTable { index: HashMap::default(), values: Vec::new() }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.values.len()
    }

    #[inline]
    pub fn contains_key(&self, sk: &u64) -> bool {
        self.index.contains_key(sk)
    }

    #[inline]
    pub fn get(&self, sk: &u64) -> Option<&T> {
        let &i = self.index.get(sk)?;
        Some(&self.values[i])
    }

    /// Asks for `sk`'s value to be brought into cache (see [`crate::prefetch`]); the index
    /// lookup this takes is the first of the two cache misses a later [`SkTable::get`] would pay.
    #[inline]
    pub fn prefetch(&self, sk: u64) {
        if let Some(&i) = self.index.get(&sk) {
            crate::prefetch::prefetch::<T>(&self.values[i]);
        }
    }

    #[inline]
    pub fn get_mut(&mut self, sk: &u64) -> Option<&mut T> {
        let &i = self.index.get(sk)?;
        Some(&mut self.values[i])
    }

    /// Stores `value` under its key, replacing the value there if any; returns the stored value.
    pub fn insert(&mut self, value: T) -> &mut T {
        let i = match self.index.entry(value.key()) {
            Entry::Occupied(o) => {
                let i = *o.get();
                self.values[i] = value;
                i
            }
            Entry::Vacant(v) => {
                if self.values.len() == self.values.capacity() {
                    // Grow by an eighth (at least 64): the slack stays small at every size.
                    self.values.reserve_exact((self.values.len() / 8).max(64));
                }
                v.insert(self.values.len());
                self.values.push(value);
                self.values.len() - 1
            }
        };
        &mut self.values[i]
    }

    pub fn remove(&mut self, sk: &u64) -> Option<T> {
        let i = self.index.remove(sk)?;
        let value = self.values.swap_remove(i);
        if let Some(moved) = self.values.get(i) {
            *self.index.get_mut(&moved.key()).expect("every stored value is indexed") = i;
        }
        Some(value)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.values.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct V(u64, u32);

    impl Keyed for V {
        fn key(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn insert_replace_remove_keep_the_index_right() {
        let mut t = SkTable::new();
        for k in 0..200u64 {
            t.insert(V(k * 0x980, k as u32));
        }
        assert_eq!(t.len(), 200);
        t.insert(V(5 * 0x980, 99)); // replaces
        assert_eq!(t.len(), 200);
        assert_eq!(t.get(&(5 * 0x980)), Some(&V(5 * 0x980, 99)));
        // Removing from the front moves the last value into the hole: it stays reachable.
        for k in (0..200u64).step_by(3) {
            assert_eq!(t.remove(&(k * 0x980)).map(|v| v.0), Some(k * 0x980));
            assert_eq!(t.remove(&(k * 0x980)), None);
        }
        for k in 0..200u64 {
            assert_eq!(t.contains_key(&(k * 0x980)), k % 3 != 0, "{k}");
            if k % 3 != 0 {
                t.get_mut(&(k * 0x980)).unwrap().1 += 1;
                assert_eq!(t.get(&(k * 0x980)).unwrap().0, k * 0x980);
            }
        }
        assert_eq!(t.len(), t.values().count());
        assert_eq!(t.values().filter(|v| v.0 == 5 * 0x980).map(|v| v.1).next(), Some(100));
    }

    #[test]
    fn values_grow_by_an_eighth() {
        let mut t = SkTable::new();
        for k in 0..10_000u64 {
            t.insert(V(k, 0));
            assert!(t.values.capacity() <= t.len() + (t.len() / 8).max(64), "{} {}", t.len(), t.values.capacity());
        }
    }
}
