//! Kernel struct member offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE field relocations, so the programs read kernel memory at offsets the
//! loader computes here and writes into their read-only data. Nothing is hard-coded: the layout
//! of `task_struct` changes with every kernel version and config.

use std::path::Path;

use monitor_common::KernelOffsets;

use crate::kernel::{
    btf_raw::{RawBtf, RawBtfError},
    detectors::KernelFeatures,
};

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    // `error`, not `source`: the message already shows it, so error chains do not repeat it.
    #[error(
        "cannot read kernel BTF at {path}: {error}; forkwatch needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.x are)"
    )]
    Unreadable { path: String, error: std::io::Error },
    // Not a `source`: the message shows it already (see `Unreadable`).
    #[error(
        "kernel BTF is malformed: {0}; --btf must name the running kernel's BTF \
         ({VMLINUX_BTF}), or a copy of it"
    )]
    Malformed(RawBtfError),
    #[error("kernel BTF has no struct {0}; this kernel is not supported")]
    NoStruct(String),
    #[error("kernel BTF: struct {strukt} has no member {member}; this kernel is not supported")]
    NoMember { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is a bitfield or not byte-aligned")]
    Unaligned { strukt: String, member: String },
    #[error("kernel BTF: {strukt}.{member} is at offset {offset}, beyond what the programs read")]
    TooFar {
        strukt: String,
        member: String,
        offset: u64,
    },
}

/// Reads the kernel BTF file at `path` whole (about 5 MB; the loader parses the same bytes).
pub fn read_btf(path: &Path) -> Result<Vec<u8>, OffsetError> {
    std::fs::read(path).map_err(|error| OffsetError::Unreadable {
        path: path.display().to_string(),
        error,
    })
}

/// Reads the offsets the programs need from the BTF file at `path`.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, OffsetError> {
    offsets_from_btf(&read_btf(path)?)
}

/// The offsets the programs need, from raw kernel BTF bytes.
pub fn offsets_from_btf(data: &[u8]) -> Result<KernelOffsets, OffsetError> {
    inspect(data).map(|(offsets, _)| offsets)
}

/// The offsets the programs need and the attach points the kernel offers, from one parse of
/// raw kernel BTF bytes.
pub fn inspect(data: &[u8]) -> Result<(KernelOffsets, KernelFeatures), OffsetError> {
    let btf = RawBtf::parse(data).map_err(OffsetError::Malformed)?;
    let offsets = offsets_in(&btf)?;
    Ok((offsets, KernelFeatures::from_btf(&btf)))
}

fn offsets_in(btf: &RawBtf) -> Result<KernelOffsets, OffsetError> {
    let finder = OffsetFinder { btf };
    // struct sock_common is embedded in struct sock as __sk_common.
    let sk_common = finder.offset("sock", "__sk_common")?;
    let common =
        |member: &str| Ok::<_, OffsetError>(sk_common + finder.offset("sock_common", member)?);
    Ok(KernelOffsets {
        task_pid: finder.offset("task_struct", "pid")?,
        task_tgid: finder.offset("task_struct", "tgid")?,
        task_mm: finder.offset("task_struct", "mm")?,
        task_signal: finder.offset("task_struct", "signal")?,
        task_start_boottime: finder.offset("task_struct", "start_boottime")?,
        task_group_leader: finder.offset("task_struct", "group_leader")?,
        task_exit_code: finder.offset("task_struct", "exit_code")?,
        signal_nr_threads: finder.offset("signal_struct", "nr_threads")?,
        signal_live: finder.offset("signal_struct", "live")?,
        // Renamed in 5.14 (and made unsigned int) so that every access is a READ_ONCE.
        task_state: finder
            .offset("task_struct", "__state")
            .or_else(|_| finder.offset("task_struct", "state"))?,
        regs_syscall_nr: finder.offset("pt_regs", SYSCALL_REGS[0])?,
        regs_arg1: finder.offset("pt_regs", SYSCALL_REGS[1])?,
        regs_arg2: finder.offset("pt_regs", SYSCALL_REGS[2])?,
        regs_arg4: finder.offset("pt_regs", SYSCALL_REGS[3])?,
        regs_arg5: finder.offset("pt_regs", SYSCALL_REGS[4])?,
        regs_ip: finder.offset("pt_regs", USER_REGS[0])?,
        regs_sp: finder.offset("pt_regs", USER_REGS[1])?,
        regs_bp: finder.offset("pt_regs", USER_REGS[2])?,
        mm_start_code: finder.offset("mm_struct", "start_code")?,
        mm_end_code: finder.offset("mm_struct", "end_code")?,
        task_files: finder.offset("task_struct", "files")?,
        files_fdt: finder.offset("files_struct", "fdt")?,
        fdtable_fd: finder.offset("fdtable", "fd")?,
        fdtable_max_fds: finder.offset("fdtable", "max_fds")?,
        skc_family: common("skc_family")?,
        skc_state: common("skc_state")?,
        skc_num: common("skc_num")?,
        skc_dport: common("skc_dport")?,
        skc_daddr: common("skc_daddr")?,
        skc_rcv_saddr: common("skc_rcv_saddr")?,
        skc_v6_daddr: common("skc_v6_daddr")?,
        skc_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        sk_type: finder.offset("sock", "sk_type")?,
        sk_protocol: finder.offset("sock", "sk_protocol")?,
        sk_socket: finder.offset("sock", "sk_socket")?,
        socket_sk: finder.offset("socket", "sk")?,
        socket_file: finder.offset("socket", "file")?,
        // The inode sits beside the socket in struct socket_alloc (SOCK_INODE()).
        socket_inode: finder.offset("socket_alloc", "vfs_inode")?
            - finder.offset("socket_alloc", "socket")?,
        inode_ino: finder.offset("inode", "i_ino")?,
        // struct unix_sock begins with its struct sock, so these are offsets from the sock.
        unix_peer: finder.offset("unix_sock", "peer")? - finder.offset("unix_sock", "sk")?,
        unix_addr: finder.offset("unix_sock", "addr")? - finder.offset("unix_sock", "sk")?,
        unix_address_len: finder.offset("unix_address", "len")?,
        unix_address_name: finder.offset("unix_address", "name")?,
        file_flags: finder.offset("file", "f_flags")?,
        file_inode: finder.offset("file", "f_inode")?,
        inode_mode: finder.offset("inode", "i_mode")?,
    })
}

/// `struct pt_regs` members with the syscall number and arguments 1, 2, 4, 5 (the x86_64 syscall
/// ABI: rdi, rsi, rdx, r10, r8, r9; the number in orig_ax). Other architectures name them
/// differently (arm64 keeps them in an array), and are not supported yet.
#[cfg(target_arch = "x86_64")]
const SYSCALL_REGS: [&str; 5] = ["orig_ax", "di", "si", "r10", "r8"];
/// `struct pt_regs` members with the user instruction, stack and frame pointers, the start of
/// a fork stack's unwinding.
#[cfg(target_arch = "x86_64")]
const USER_REGS: [&str; 3] = ["ip", "sp", "bp"];
#[cfg(not(target_arch = "x86_64"))]
compile_error!("forkwatch reads syscall registers from x86_64 pt_regs; port SYSCALL_REGS first");

struct OffsetFinder<'a> {
    btf: &'a RawBtf<'a>,
}

impl OffsetFinder<'_> {
    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs and unions.
    fn offset(&self, strukt: &str, member: &str) -> Result<u32, OffsetError> {
        let id = self
            .btf
            .struct_by_name(strukt)
            .ok_or_else(|| OffsetError::NoStruct(strukt.to_owned()))?;
        let found = self
            .btf
            .member_bits(id, member)
            .ok_or_else(|| OffsetError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            })?;
        if found.bitfield || found.bit_offset % 8 != 0 {
            return Err(OffsetError::Unaligned {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            });
        }
        let bytes = found.bit_offset / 8;
        u32::try_from(bytes).map_err(|_| OffsetError::TooFar {
            strukt: strukt.to_owned(),
            member: member.to_owned(),
            offset: bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF when there is one; the loader depends on every offset resolving.
    #[test]
    fn resolves_every_offset_on_this_kernel() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("SKIP: {VMLINUX_BTF} does not exist on this machine");
            return;
        }
        let offsets = kernel_offsets(path).expect("offsets");
        // pid and tgid are adjacent pid_t members of task_struct on every kernel since 2.6.
        assert_eq!(offsets.task_tgid, offsets.task_pid + 4);
        assert!(offsets.task_signal > offsets.task_pid);
        assert!(offsets.signal_nr_threads > 0);
        // x86_64 pt_regs: r10 .. r8 .. si, di, orig_ax are 8-byte slots in this order.
        assert_eq!(offsets.regs_arg5, offsets.regs_arg4 + 16);
        assert_eq!(offsets.regs_arg1, offsets.regs_arg2 + 8);
        assert_eq!(offsets.regs_syscall_nr, offsets.regs_arg1 + 8);
        // sock_common: the IPv4 addresses are the first 8 bytes, dport then num right after.
        assert_eq!(offsets.skc_rcv_saddr, offsets.skc_daddr + 4);
        assert_eq!(offsets.skc_num, offsets.skc_dport + 2);
        assert!(offsets.sk_socket > offsets.skc_v6_rcv_saddr);
    }

    #[test]
    fn missing_btf_names_the_fix() {
        let err = kernel_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
