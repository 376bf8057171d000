//! The only place that calls the kernel's unsafe helpers: reads of kernel memory at the member
//! offsets the loader found in BTF (`KernelOffsets`), reads of user memory, and the helpers that
//! only return a value (clock, cgroup, current task). Everything here is a safe function, so the
//! programs contain no raw reads of their own.
//!
//! Why a read can be safe: `bpf_probe_read_kernel` / `_user` copy through the kernel's
//! fault-handling copy routine, so any address (a null or stale pointer, a wrong offset) yields an
//! error, never a fault, and the only memory the program writes is its own destination. What is
//! left for Rust is that the copied bytes must be a valid value of the destination type:
//! [`Plain`] limits reads to types for which every bit pattern is one.

use aya_ebpf::helpers::{
    bpf_get_current_cgroup_id, bpf_get_current_task_btf, bpf_ktime_get_boot_ns,
    bpf_probe_read_kernel, bpf_probe_read_user, bpf_task_pt_regs,
    generated::{self, bpf_probe_read_kernel_str},
};
use monitor_common::{KernelOffsets, UNIX_PATH_LEN};

/// Types for which every bit pattern is a valid value: integers, byte arrays, raw pointers.
///
/// # Safety
/// An implementor must accept any bytes: [`read`] and the map helpers produce values from memory
/// another CPU or the kernel may have written anything to.
pub unsafe trait Plain: Copy {}

macro_rules! plain {
    ($($t:ty),* $(,)?) => {
        // SAFETY: integers and raw pointers (never dereferenced by the programs, only passed
        // back to the read helpers) have no invalid bit patterns.
        $(unsafe impl Plain for $t {})*
    };
}
plain!(u8, u16, u32, u64, i32, *const u8);
// SAFETY: an array of `u8` is valid for any bytes, like `u8` itself.
unsafe impl<const N: usize> Plain for [u8; N] {}
// SAFETY: an array of `u64` is valid for any bytes, like `u64` itself.
unsafe impl<const N: usize> Plain for [u64; N] {}

/// Reads a `T` at `base + offset` in kernel memory (a struct member at a BTF offset).
#[inline(always)]
pub fn read<T: Plain>(base: *const u8, offset: u32) -> Result<T, i32> {
    // The address is only handed to the helper, never dereferenced: wrapping arithmetic, no
    // in-bounds promise needed.
    let src = base.wrapping_add(offset as usize) as *const T;
    // SAFETY: the helper copies size_of::<T>() bytes with fault handling (a bad address is an
    // error, not a fault) into its own local; `T: Plain` accepts whatever bytes it copied.
    unsafe { bpf_probe_read_kernel(src) }
}

/// Reads a `T` at `addr` in the current process's user memory.
#[inline(always)]
pub fn read_user<T: Plain>(addr: u64) -> Result<T, i32> {
    // SAFETY: as in `read`: a faulting copy into a local, and `T: Plain` accepts any bytes.
    unsafe { bpf_probe_read_user(addr as *const T) }
}

/// CLOCK_BOOTTIME in ns: the clock of every timestamp on the wire.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no memory access; it returns a number.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The cgroup (v2) id of the current task.
#[inline(always)]
pub fn current_cgroup_id() -> u64 {
    // SAFETY: no arguments; it reads the current task's cgroup in the kernel and returns a number.
    unsafe { bpf_get_current_cgroup_id() }
}

/// `current`, as an address for [`read`]; never dereferenced here.
#[inline(always)]
pub fn current_task() -> *const u8 {
    // SAFETY: no arguments; it returns the current task's address.
    unsafe { bpf_get_current_task_btf() as *const u8 }
}

/// The current task's saved user registers (`struct pt_regs`), or null.
#[inline(always)]
pub fn current_regs() -> *const u8 {
    // SAFETY: both helpers take or return only the current task's address (a trusted BTF
    // pointer the verifier tracks); the result is only read through `read`.
    unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as *const u8 }
}

/// The syscall the current task is in (orig_ax), from its saved user registers.
#[inline(always)]
pub fn current_syscall(offsets: &KernelOffsets) -> u32 {
    let regs = current_regs();
    if regs.is_null() {
        return u32::MAX;
    }
    read::<u64>(regs, offsets.regs_syscall_nr).map_or(u32::MAX, |nr| nr as u32)
}

/// Copies `len` bytes of the current process's user memory at `src` to `dst`, all or nothing
/// (a failed copy zeroes `dst`).
///
/// # Safety
/// `dst` must be valid for writes of `len` bytes; `len` a constant, for the verifier.
#[inline(always)]
pub unsafe fn read_user_bytes(dst: *mut u8, len: u32, src: u64) -> Result<(), i32> {
    // SAFETY: the caller promises `dst` holds `len` bytes; the helper writes at most that many
    // and reads `src` with fault handling.
    let ret = unsafe { generated::bpf_probe_read_user(dst.cast(), len, (src as *const u8).cast()) };
    if ret < 0 { Err(ret as i32) } else { Ok(()) }
}

/// `task->group_leader->start_boottime`: when the task's process started (its identity with the
/// pid, across pid reuse).
#[inline(always)]
pub fn process_start_ns(task: *const u8, offsets: &KernelOffsets) -> Result<u64, i32> {
    let leader: *const u8 = read(task, offsets.task_group_leader)?;
    read(leader, offsets.task_start_boottime)
}

/// `current->files->fdt->fd[fd]`, or null.
#[inline(always)]
pub fn current_fd_file(fd: u32, offsets: &KernelOffsets) -> Result<*const u8, i32> {
    let files: *const u8 = read(current_task(), offsets.task_files)?;
    let fdt: *const u8 = read(files, offsets.files_fdt)?;
    let max_fds: u32 = read(fdt, offsets.fdtable_max_fds)?;
    if fd >= max_fds {
        return Ok(core::ptr::null());
    }
    let fds: *const u8 = read(fdt, offsets.fdtable_fd)?;
    read(fds, fd * 8)
}

/// `SOCK_INODE(sk->sk_socket)->i_ino`: the socket's inode, embedded in `struct socket_alloc`.
#[inline(always)]
pub fn socket_inode(sk: *const u8, offsets: &KernelOffsets) -> Result<u64, i32> {
    let socket: *const u8 = read(sk, offsets.sk_socket)?;
    if socket.is_null() {
        return Ok(0);
    }
    let inode = socket.wrapping_add(offsets.socket_inode as usize);
    read(inode, offsets.inode_ino)
}

/// The bound path of a Unix socket (`unix_sk(sk)->addr->name->sun_path`) into `out`, which the
/// caller has zeroed: a path up to its NUL; an abstract name as its leading NUL followed by the
/// name, as long as the address says (what ss(8) shows as "@name"); nothing when unbound.
/// Nothing but the name is left in `out`: a record's bytes are whatever an older record left in
/// the ring buffer, and a stale tail would read as a name.
#[inline(always)]
pub fn unix_path(sk: *const u8, offsets: &KernelOffsets, out: &mut [u8; UNIX_PATH_LEN]) {
    let Ok(addr) = read::<*const u8>(sk, offsets.unix_addr) else {
        return;
    };
    if addr.is_null() {
        return;
    }
    // struct sockaddr_un { sa_family_t sun_family; char sun_path[108]; }
    let path = addr.wrapping_add(offsets.unix_address_name as usize + 2);
    // SAFETY: `out` is valid for writes of UNIX_PATH_LEN bytes, the size passed; the helper
    // writes at most that many (NUL included) and reads `path` with fault handling.
    let _ = unsafe {
        bpf_probe_read_kernel_str(out.as_mut_ptr().cast(), UNIX_PATH_LEN as u32, path.cast())
    };
    if out[0] != 0 {
        return;
    }
    // An abstract name: its first byte is NUL, so the string read above stopped there. It is
    // not NUL-terminated: the address length (sun_family, the NUL, the name) ends it.
    let Ok(len) = read::<i32>(addr, offsets.unix_address_len) else {
        return;
    };
    let name_len = (len as u32)
        .saturating_sub(3)
        .min((UNIX_PATH_LEN - 1) as u32);
    let (_, name) = out.split_at_mut(1);
    // SAFETY: `name` is valid for writes of UNIX_PATH_LEN - 1 bytes and `name_len` is at most
    // that (checked above, which the verifier also sees); the helper reads `path + 1` (inside
    // the same sun_path) with fault handling.
    let _ = unsafe {
        generated::bpf_probe_read_kernel(
            name.as_mut_ptr().cast(),
            name_len,
            path.wrapping_add(1).cast(),
        )
    };
}
