//! A small least-recently-used map: the bound on the cuDNN convolution caches (`cuda::cudnn`),
//! kept free of CUDA so its eviction is tested on every build.

use std::collections::HashMap;
use std::hash::Hash;

/// At most `capacity` entries; inserting into a full map evicts the entry used least recently
/// (by [`LruMap::get`] or insertion). Eviction scans the entries: the maps hold a few hundred at
/// most and only insert on a cache miss, which costs far more than the scan.
#[derive(Debug)]
pub(crate) struct LruMap<K, V> {
    entries: HashMap<K, (V, u64)>,
    clock: u64,
    capacity: usize,
}

impl<K: Hash + Eq + Clone, V> LruMap<K, V> {
    /// A map of at most `capacity` (at least 1) entries.
    pub(crate) fn new(capacity: usize) -> Self {
        Self { entries: HashMap::new(), clock: 0, capacity: capacity.max(1) }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The value under `key`, marked as the most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<&mut V> {
        let now = self.tick();
        self.entries.get_mut(key).map(|(value, used)| {
            *used = now;
            value
        })
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Inserts (or replaces) `key`, returning the entry evicted to make room, if any.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<(K, V)> {
        let now = self.tick();
        let mut evicted = None;
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                evicted = self.entries.remove(&oldest).map(|(value, _)| (oldest, value));
            }
        }
        self.entries.insert(key, (value, now));
        evicted
    }

    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::LruMap;

    #[test]
    fn evicts_the_least_recently_used_at_capacity() {
        let mut map = LruMap::new(3);
        for k in 0..3 {
            assert!(map.insert(k, k * 10).is_none());
        }
        assert_eq!(map.len(), 3);
        // 0 is used again, so 1 is now the oldest.
        assert_eq!(map.get(&0).copied(), Some(0));
        assert_eq!(map.insert(3, 30), Some((1, 10)));
        assert_eq!(map.len(), 3);
        assert!(!map.contains(&1) && map.contains(&0) && map.contains(&3));
        // Replacing a present key evicts nothing.
        assert!(map.insert(3, 31).is_none());
        assert_eq!(map.get(&3).copied(), Some(31));
        // Many more distinct keys: the size never passes the capacity, the newest stay.
        for k in 10..1000 {
            map.insert(k, k);
            assert!(map.len() <= 3);
        }
        assert!(map.contains(&999) && map.contains(&998) && map.contains(&997));
        assert_eq!(map.get(&5), None);
        // Capacity 0 is taken as 1.
        let mut one = LruMap::new(0);
        one.insert('a', 1);
        assert_eq!(one.insert('b', 2), Some(('a', 1)));
        assert_eq!(one.len(), 1);
    }
}
