//! A caching allocator per device: memory from a provider's allocator is kept when a tensor
//! drops and handed out again for the next request of the same size class, so a model in
//! steady state never reaches the driver (`cudaMalloc` synchronises the whole device).
//!
//! Size classes: powers of two up to 1 MiB, then whole MiB, so a model whose shapes repeat
//! reuses exactly the blocks it freed. Cached blocks go back to the provider when an
//! allocation fails (then it is retried once) and when the plugin is unloaded.

use opreg_sdk::MemRef;
use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

const MIB: usize = 1 << 20;

/// The size class `bytes` is served from (at least 256 bytes).
pub fn size_class(bytes: usize) -> Option<usize> {
    if bytes <= MIB {
        Some(bytes.max(256).next_power_of_two())
    } else {
        bytes.checked_next_multiple_of(MIB)
    }
}

/// Counters of one pool, for statistics and benchmarks.
#[derive(Default, Debug)]
pub struct PoolStats {
    /// Allocations served by the provider's allocator.
    pub driver_allocs: AtomicU64,
    /// Allocations served from the cache.
    pub reused: AtomicU64,
}

/// Cached free blocks of one device, by size class.
#[derive(Default)]
pub struct Pool {
    free: Mutex<BTreeMap<usize, Vec<MemRef>>>,
    pub stats: PoolStats,
}

impl Pool {
    /// A cached block of class `class`, if any.
    pub fn take(&self, class: usize) -> Option<MemRef> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let mem = free.get_mut(&class).and_then(Vec::pop);
        if mem.is_some() {
            self.stats.reused.fetch_add(1, Ordering::Relaxed);
        }
        mem
    }

    /// Records a block the provider allocated.
    pub fn note_driver_alloc(&self) {
        self.stats.driver_allocs.fetch_add(1, Ordering::Relaxed);
    }

    /// Returns a block to the cache.
    pub fn put(&self, class: usize, mem: MemRef) {
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(class)
            .or_default()
            .push(mem);
    }

    /// Every cached block, removed from the cache (to be freed by the provider).
    pub fn drain(&self) -> Vec<(usize, MemRef)> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *free)
            .into_iter()
            .flat_map(|(class, v)| v.into_iter().map(move |m| (class, m)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_and_never_shrink() {
        assert_eq!(size_class(0), Some(256));
        assert_eq!(size_class(257), Some(512));
        assert_eq!(size_class(MIB), Some(MIB));
        assert_eq!(size_class(MIB + 1), Some(2 * MIB));
        assert_eq!(size_class(5 * MIB - 3), Some(5 * MIB));
        assert_eq!(size_class(usize::MAX), None);
        for b in [1, 300, 70_000, 3 * MIB + 5] {
            assert!(size_class(b).unwrap() >= b);
        }
    }
}
