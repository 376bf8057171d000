//! The daemon's side of the member filters (`TRACKED_SLOTS`, `FAMILY_SLOTS`: see the eBPF
//! `maps`). The hooks every task on the host runs look a pid up in `TRACKED` or `FAMILY` only
//! when its filter slot is taken, so every entry must be counted there: the entries the daemon
//! seeds at start are counted in the daemon's count of the slot, which no kernel program writes,
//! before the insert, and uncounted after a removal the daemon made. (An entry the kernel
//! programs remove is uncounted in their count; the sum of the two stays right.)

use aya::maps::{Array, HashMap as BpfHashMap, MapData, MapError};
use monitor_common::member_slot;

/// BPF_NOEXIST, for the daemon's inserts at start: an entry the kernel programs made since
/// attaching is newer than /proc's.
pub(crate) const NO_EXIST: u64 = 1;

/// A map of processes (pid → `V`) with its member filter.
pub struct Members<V: aya::Pod> {
    map: BpfHashMap<MapData, u32, V>,
    slots: Array<MapData, u64>,
}

impl<V: aya::Pod> Members<V> {
    pub(super) fn new(map: BpfHashMap<MapData, u32, V>, slots: Array<MapData, u64>) -> Self {
        Self { map, slots }
    }

    /// The map, to read.
    pub fn map(&self) -> &BpfHashMap<MapData, u32, V> {
        &self.map
    }

    /// Inserts `pid` unless the kernel programs have it already (their entry is newer), counted
    /// in the daemon's count of its slot first and uncounted if the insert is refused.
    pub fn insert_new(&mut self, pid: u32, value: &V) -> Result<(), MapError> {
        self.count(pid, 1)?;
        let inserted = self.map.insert(&pid, value, NO_EXIST);
        if inserted.is_err() {
            self.count(pid, u64::MAX)?;
        }
        inserted
    }

    /// Removes `pid`, uncounting it if it was there to remove.
    pub fn remove(&mut self, pid: u32) -> Result<(), MapError> {
        self.map.remove(&pid)?;
        self.count(pid, u64::MAX)
    }

    /// Adds `delta` (two's complement to subtract) to the daemon's count of `pid`'s slot. The
    /// daemon is its only writer (one thread, at start), so read-then-write loses nothing.
    fn count(&mut self, pid: u32, delta: u64) -> Result<(), MapError> {
        let index = member_slot(pid) + 1;
        let count = self.slots.get(&index, 0)?;
        self.slots.set(index, &count.wrapping_add(delta), 0)
    }
}
