//! A small LRU cache of metadata clusters (L2 tables, refcount blocks) keyed by file offset.
//! Writing dirty entries back is the owner's job, because the order of write-back matters.
use std::collections::HashMap;

pub(crate) struct Slot {
    pub data: Vec<u8>,
    pub dirty: bool,
    used: u64,
}

pub(crate) struct MetaCache {
    capacity: usize,
    tick: u64,
    map: HashMap<u64, Slot>,
}

impl MetaCache {
    pub fn new(capacity: usize) -> Self {
        MetaCache { capacity: capacity.max(2), tick: 0, map: HashMap::new() }
    }

    pub fn contains(&self, off: u64) -> bool {
        self.map.contains_key(&off)
    }

    pub fn get_mut(&mut self, off: u64) -> Option<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.map.get_mut(&off)?;
        slot.used = tick;
        Some(slot)
    }

    /// The entry to evict before inserting another one, if the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.map.len() < self.capacity {
            return None;
        }
        self.map.iter().min_by_key(|(_, s)| s.used).map(|(&off, s)| (off, s.dirty))
    }

    pub fn insert(&mut self, off: u64, data: Vec<u8>, dirty: bool) -> &mut Slot {
        self.tick += 1;
        let slot = Slot { data, dirty, used: self.tick };
        self.map.entry(off).insert_entry(slot).into_mut()
    }

    pub fn remove(&mut self, off: u64) -> Option<Slot> {
        self.map.remove(&off)
    }

    /// Offsets of dirty entries, ascending (so write-back is sequential).
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.map.iter().filter(|(_, s)| s.dirty).map(|(&o, _)| o).collect();
        v.sort_unstable();
        v
    }
}
