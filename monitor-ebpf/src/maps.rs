//! Every map of the programs (the daemon finds them by these names: see
//! `monitor_common::names`), and the small safe helpers the programs use them through. Lookups
//! copy the value out or only test for presence, so no program holds a reference into a map
//! value another CPU may be changing; the one write in place (`holder`) is a single store.

use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use monitor_common::{
    BLOCKED_MAX_ENTRIES, BlockedWait, FAMILY_MAX_ENTRIES, FORK_SITE_WORDS, FORK_STACK_MAX_ENTRIES,
    MEMBER_SLOTS, RING_BUFFER_BYTES, SOCKET_MAX_ENTRIES, SockPid, SockUser, TRACKED_MAX_ENTRIES,
    TREE_MAX_ENTRIES, fork_counter, lost_category, map_full, member_slot,
};

use crate::{FORKWATCH_TREE_ROOT, FORKWATCH_WAKEUP_BYTES, kread::Plain};

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BUFFER_BYTES, 0);

/// Processes created by a multithreaded fork that have not exec'd or exited yet
/// (pid → child start time). Filled here, emptied by exec/exit; the daemon adds the ones it
/// finds at start. Changed only through [`insert_member`] and [`remove_member`] here (and the
/// daemon's counterpart), which keep `TRACKED_SLOTS`.
#[map]
pub static TRACKED: HashMap<u32, u64> = HashMap::with_max_entries(TRACKED_MAX_ENTRIES, 0);

/// The member filters: per slot (a pid's low bits, `MEMBER_SLOTS` of them), how many keys of
/// `TRACKED` (`FAMILY`) fall in it. The hooks that run for every task on the host (every
/// context switch while something is tracked, every socket send and receive) read the slot of
/// the current pid first, array reads the verifier inlines, and hash the pid into the map only
/// when the slot is taken: nearly every task on the host is in neither map, and finds its slot
/// empty.
///
/// Two counts per slot, so that no update can lose another: element 2 × slot counts the entries
/// these programs inserted (atomic adds), 2 × slot + 1 those the daemon seeded at start (its only
/// writer); side by side, so a check reads one cache line. Whoever inserts an entry counts it in
/// its own element first, and whoever removes one uncounts it in its own element after (so the
/// programs' count may go below zero: an entry the daemon seeded that exec or exit removed). The
/// wrapping sum of a slot's two counts is never below the number of keys in it; above it only
/// for a moment, or after two inserts of one key raced, which costs the slot's pids a lookup,
/// never a miss.
#[map]
pub static TRACKED_SLOTS: Array<u64> = Array::with_max_entries(2 * MEMBER_SLOTS, 0);

/// The member filter of `FAMILY` (see `TRACKED_SLOTS`).
#[map]
pub static FAMILY_SLOTS: Array<u64> = Array::with_max_entries(2 * MEMBER_SLOTS, 0);

/// Threads of tracked processes asleep in a futex wait (tid → the wait), for the daemon to scan.
/// Changed only through [`block`] and [`unblock`], which keep `BLOCKED_COUNT`.
#[map]
static BLOCKED: HashMap<u32, BlockedWait> = HashMap::with_max_entries(BLOCKED_MAX_ENTRIES, 0);

/// Fork families (tgid → the family's root pid): a process that forked without exec, and its
/// children until they exec. Every member's socket I/O is watched; everyone else's costs a read
/// of `FAMILY_SLOTS` (and a lookup when its slot is taken). Changed only through
/// [`insert_member`] and [`remove_member`] (and the daemon's seeding). A plain hash map, not
/// LRU: exec and exit remove entries in the kernel, so none is ever orphaned, and LRU inserts
/// and deletes cost a third more on every fork and exec
/// (measured: 4.0 → 2.9 µs per fork, 3.8 → 2.6 µs per exec in a fork+exec storm).
#[map]
pub static FAMILY: HashMap<u32, u32> = HashMap::with_max_entries(FAMILY_MAX_ENTRIES, 0);

/// When a fork last woke the daemon, per forking thread ([pid_tgid, process start] → boot ns): see
/// `fork_wakeup_flags`. LRU: nothing removes entries, and a forgotten one only costs a wakeup.
#[map]
pub static FORK_WAKEUPS: LruHashMap<[u64; 2], u64> = LruHashMap::with_max_entries(4096, 0);

/// When a fork stack was last sent, per [pid_tgid, process start, sp, ip, site] → boot ns: see
/// `lifecycle::send_fork_stack`. LRU: nothing removes entries, and a forgotten one only costs a
/// copy sent again.
#[map]
pub static FORK_STACKS: LruHashMap<[u64; 5], u64> =
    LruHashMap::with_max_entries(FORK_STACK_MAX_ENTRIES, 0);

/// Copies sent per forking thread ([pid_tgid, process start] → [burst start ns, copies]): the
/// cap of FORK_STACK_BURST per FORK_STACK_BURST_NS.
#[map]
pub static FORK_STACK_BURSTS: LruHashMap<[u64; 2], [u64; 2]> =
    LruHashMap::with_max_entries(FORK_STACK_MAX_ENTRIES, 0);

/// Per-CPU room for the words above a forking thread's sp that make its call site's
/// fingerprint (1 KiB: too much for the program's 512-byte stack).
#[map]
pub static FORK_SITE_SCRATCH: PerCpuArray<[u64; FORK_SITE_WORDS]> =
    PerCpuArray::with_max_entries(1, 0);

/// Children in a fork family that have not exec'd (pid → when they joined). The daemon scans it
/// to attach the write probe only while some child has gone without exec for the grace window.
/// Plain hash map, like FAMILY.
#[map]
pub static CHILDREN: HashMap<u32, u64> = HashMap::with_max_entries(FAMILY_MAX_ENTRIES, 0);

/// The watched tree of `forkwatch exec`: every live process descending from
/// `FORKWATCH_TREE_ROOT` (tgid → 1). Sized 1 by the daemon, which watches no tree. A plain hash
/// map: exit removes its entries, and an LRU could evict a live member, whose descendants
/// would then go unwatched.
#[map]
pub static TREE: HashMap<u32, u8> = HashMap::with_max_entries(TREE_MAX_ENTRIES, 0);

/// Open file description (`struct file *`) → the family member that writes through it.
#[map]
pub static FILE_USERS: LruHashMap<u64, SockUser> =
    LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// (file, process) pairs already reported.
#[map]
pub static FILE_REPORTED: LruHashMap<SockPid, u8> =
    LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// Socket inode → the family member that moves data on it.
#[map]
pub static SOCK_USERS: LruHashMap<u64, SockUser> =
    LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// (socket inode, process) pairs already reported: each is sent to userspace once.
#[map]
pub static SOCK_REPORTED: LruHashMap<SockPid, u8> =
    LruHashMap::with_max_entries(SOCKET_MAX_ENTRIES, 0);

/// How many entries `BLOCKED` holds. Every insert and delete of it is in these programs and
/// adjusts the count, so with none (nearly always) `sched_wakeup` returns after one array read,
/// before reading the task or hashing. A stale high count is only slower, never wrong; it
/// cannot read 0 with an entry present: the insert and its increment happen in `sched_switch`
/// before the sleeping task is off its CPU, which a wakeup of that task waits for.
#[map]
static BLOCKED_COUNT: Array<u64> = Array::with_max_entries(1, 0);

/// Every fork the kernel sees, by `fork_counter` kind.
#[map]
pub static FORK_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(fork_counter::COUNT, 0);

/// Failed ring-buffer reservations, by `lost_category`.
#[map]
pub static LOST_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost_category::COUNT, 0);

/// Inserts a full map refused, by `map_full` index: what went unwatched is exported, not hidden.
#[map]
pub static MAP_FULL: PerCpuArray<u64> = PerCpuArray::with_max_entries(map_full::COUNT, 0);

/// Inserts into a plain hash map, counting a refusal (the map is full) under `index` of
/// `MAP_FULL`.
#[inline(always)]
pub fn insert<K, V>(map: &HashMap<K, V>, key: &K, value: &V, index: u32) -> Result<(), i32> {
    let inserted = map.insert(key, value, 0);
    if inserted.is_err() {
        count(&MAP_FULL, index);
    }
    inserted
}

/// Submit flags of records the daemon acts on at once (forks, shared sockets and files): it
/// reads the processes' /proc entries, which a short-lived process takes with it. Forced: the
/// kernel's own policy (flags 0) wakes only a reader that has caught up, and routine records
/// left for the drain tick mean it has not.
pub const URGENT: u64 = BPF_RB_FORCE_WAKEUP as u64;

/// Submit flags of routine records: see FORKWATCH_WAKEUP_BYTES.
#[inline(always)]
pub fn wakeup_flags() -> u64 {
    let pending = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if pending >= FORKWATCH_WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// The lookup both hash-map flavours share, for [`contains`] and [`copied`].
pub trait Lookup<K, V> {
    fn value_ptr(&self, key: &K) -> Option<*const V>;
}

impl<K, V> Lookup<K, V> for HashMap<K, V> {
    #[inline(always)]
    fn value_ptr(&self, key: &K) -> Option<*const V> {
        self.get_ptr(key)
    }
}

impl<K, V> Lookup<K, V> for LruHashMap<K, V> {
    #[inline(always)]
    fn value_ptr(&self, key: &K) -> Option<*const V> {
        self.get_ptr(key)
    }
}

/// Whether `map` has `key`. Cheaper than a delete for a key that is (nearly always) absent: a
/// lookup takes no bucket lock.
#[inline(always)]
pub fn contains<K, V>(map: &impl Lookup<K, V>, key: &K) -> bool {
    map.value_ptr(key).is_some()
}

/// A copy of the value under `key`.
#[inline(always)]
pub fn copied<K, V: Plain>(map: &impl Lookup<K, V>, key: &K) -> Option<V> {
    // SAFETY: a lookup's pointer stays valid until the program returns (the kernel frees map
    // elements only after an RCU grace period) and is aligned for V. Another CPU may update or
    // delete the element meanwhile; the copy is then stale or mixed, and `V: Plain` makes any
    // bytes a valid value.
    map.value_ptr(key).map(|value| unsafe { *value })
}

/// Adds one to slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn count(map: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = map.get_ptr_mut(index) {
        // SAFETY: the slot is this CPU's own aligned u64, valid while the program runs. Only
        // programs on this CPU write it, so the worst interleaving (a preemptible sys_enter
        // program, then another program on the same CPU) loses one count, never memory.
        unsafe { *slot += 1 };
    }
}

/// Whether any thread may be in `BLOCKED` (`u64::MAX` if the count cannot be read).
#[inline(always)]
pub fn blocked_count() -> u64 {
    BLOCKED_COUNT.get(0).copied().unwrap_or(u64::MAX)
}

/// Adds `delta` (two's complement for a decrement) to slot `index` of `counts`, atomically:
/// the programs run on every CPU at once.
#[inline(always)]
fn atomic_add(counts: &Array<u64>, index: u32, delta: u64) {
    if let Some(slot) = counts.get_ptr_mut(index) {
        // SAFETY: the map's value is a valid, aligned u64 for the program's lifetime, and every
        // writer in the kernel changes it with this atomic add (the daemon writes only elements
        // no program writes: see TRACKED_SLOTS).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                slot, delta,
            )
        };
    }
}

/// Adds `delta` to `BLOCKED_COUNT`.
fn blocked_count_add(delta: u64) {
    atomic_add(&BLOCKED_COUNT, 0, delta);
}

/// Whether `pid` may be a key of the map `slots` filters (`TRACKED_SLOTS`, `FAMILY_SLOTS`);
/// false means it certainly is not. Two array reads the verifier inlines, no hashing.
#[inline(always)]
pub fn may_hold(slots: &Array<u64>, pid: u32) -> bool {
    let ours = member_slot(pid);
    match (slots.get(ours), slots.get(ours + 1)) {
        (Some(ours), Some(daemons)) => ours.wrapping_add(*daemons) != 0,
        _ => true,
    }
}

/// Inserts (or overwrites) `pid` in `map`, which `slots` filters, keeping the count: a new key
/// is counted before the insert, uncounted again if the insert is refused (a refusal because
/// the map is full is counted under `index` of `MAP_FULL`). No lookup first: every caller
/// inserts a key that is nearly always absent (a child's pid at its fork, a parent just looked
/// up), where a lookup would only miss, one cold bucket read more per fork; a key present after
/// all (a pid reused before its entry went) is overwritten and counted once.
#[inline(always)]
pub fn insert_member<V>(
    map: &HashMap<u32, V>,
    slots: &Array<u64>,
    pid: u32,
    value: &V,
    index: u32,
) -> Result<(), i32> {
    let slot = member_slot(pid);
    atomic_add(slots, slot, 1);
    let inserted = map.insert(&pid, value, BPF_NOEXIST as u64);
    if let Err(err) = inserted {
        atomic_add(slots, slot, u64::MAX);
        if err == -EEXIST {
            // Already there, and counted (by whoever inserted it): overwrite only while it is
            // (BPF_EXIST), so that a removal in between cannot leave an entry nobody counted.
            return map.insert(&pid, value, BPF_EXIST as u64);
        }
        count(&MAP_FULL, index);
    }
    inserted
}

/// Removes `pid` from `map`, which `slots` filters, uncounting it if it was there; whether it
/// was (the delete answers what a lookup first would have, at one bucket visit).
#[inline(always)]
pub fn remove_member<V>(map: &HashMap<u32, V>, slots: &Array<u64>, pid: u32) -> bool {
    let removed = map.remove(&pid).is_ok();
    if removed {
        atomic_add(slots, member_slot(pid), u64::MAX);
    }
    removed
}

/// Whether process `pid` is tracked: its filter slot first, the map only when that is taken.
#[inline(always)]
pub fn is_tracked(pid: u32) -> bool {
    may_hold(&TRACKED_SLOTS, pid) && contains(&TRACKED, &pid)
}

/// The fork family of process `pid`, if it is in one: its filter slot first, as `is_tracked`.
#[inline(always)]
pub fn family_of(pid: u32) -> Option<u32> {
    if !may_hold(&FAMILY_SLOTS, pid) {
        return None;
    }
    copied(&FAMILY, &pid)
}

/// Whether process `pid` descends from the watched tree's root. Always false (and compiled
/// out by the verifier: the root is read-only) when there is no tree.
#[inline(always)]
pub fn in_tree(pid: u32) -> bool {
    FORKWATCH_TREE_ROOT.load() != 0 && contains(&TREE, &pid)
}

/// Makes `child` a member of the watched tree if its parent (the current process) is the root
/// or a member; whether it did. A full map is counted: the child's hazards go unwatched.
#[inline(always)]
pub fn join_tree(parent: u32, child: u32) -> bool {
    let root = FORKWATCH_TREE_ROOT.load();
    if root == 0 || (parent != root && !contains(&TREE, &parent)) {
        return false;
    }
    let _ = insert(&TREE, &child, &1, map_full::TREE);
    true
}

/// Takes `pid` out of the watched tree when it exits (a lookup first, as in `leave_family`).
#[inline(always)]
pub fn leave_tree(pid: u32) {
    if in_tree(pid) {
        let _ = TREE.remove(&pid);
    }
}

/// The errno of an insert that found the key (BPF_NOEXIST).
const EEXIST: i32 = 17;

/// Records that `tid` sleeps in `wait`, keeping the count.
#[inline(always)]
pub fn block(tid: u32, wait: &BlockedWait) -> Result<(), i32> {
    let new = !contains(&BLOCKED, &tid);
    insert(&BLOCKED, &tid, wait, map_full::BLOCKED)?;
    if new {
        blocked_count_add(1);
    }
    Ok(())
}

/// Removes `tid` from `BLOCKED` if it is there, keeping the count.
pub fn unblock(tid: u32) {
    if contains(&BLOCKED, &tid) && BLOCKED.remove(&tid).is_ok() {
        blocked_count_add(u64::MAX);
    }
}

/// What a users map (`SOCK_USERS`, `FILE_USERS`) holds for a resource a family member just used.
pub enum Holder {
    /// This process: its latest use is noted.
    Me,
    /// Another member of the family.
    Other(SockUser),
    /// No one, or a member of another family.
    Nobody,
}

/// Looks up who uses the resource `key` in `users`; if it is `pid` of `family`, notes `now` as its
/// latest use (steady traffic of the current user). One lookup, on every use of a watched
/// resource.
#[inline(always)]
pub fn holder(
    users: &LruHashMap<u64, SockUser>,
    key: u64,
    family: u32,
    pid: u32,
    now: u64,
) -> Holder {
    let Some(user) = users.get_ptr_mut(&key) else {
        return Holder::Nobody;
    };
    // SAFETY: the pointer is valid and aligned until the program returns (see `copied`) and
    // SockUser is plain integers, so reading it mixed with another CPU's update is still a valid
    // value. The store of `last_ns` is an aligned u64 store into the element: a racing writer
    // can only overwrite it, which delays a report, never misplaces memory.
    unsafe {
        if (*user).family != family {
            return Holder::Nobody;
        }
        if (*user).pid == pid {
            (*user).last_ns = now;
            return Holder::Me;
        }
        Holder::Other(*user)
    }
}
