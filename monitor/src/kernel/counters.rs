//! The kernel programs' per-CPU counters (forks seen, events lost, inserts a full map refused),
//! summed for the metrics.

use aya::maps::{MapData, PerCpuArray};
use monitor_common::{fork_counter, lost_category, map_full};

/// Sums of the per-CPU counters, as of one read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub forks: [u64; fork_counter::COUNT as usize],
    pub lost: [u64; lost_category::COUNT as usize],
    pub full: [u64; map_full::COUNT as usize],
}

pub struct KernelCounters {
    pub(super) forks: PerCpuArray<MapData, u64>,
    pub(super) lost: PerCpuArray<MapData, u64>,
    pub(super) full: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    pub fn read(&self) -> KernelCounts {
        let mut counts = KernelCounts::default();
        sum_into(&self.forks, &mut counts.forks);
        sum_into(&self.lost, &mut counts.lost);
        sum_into(&self.full, &mut counts.full);
        counts
    }
}

fn sum_into(map: &PerCpuArray<MapData, u64>, out: &mut [u64]) {
    for (index, slot) in out.iter_mut().enumerate() {
        // A failed read leaves the counter where it was; the next scrape tries again.
        if let Ok(values) = map.get(&(index as u32), 0) {
            *slot = values.iter().sum();
        }
    }
}
