//! Kernel struct member offsets from the running kernel's BTF.
//!
//! Rust eBPF has no CO-RE field relocations, so the programs read kernel memory at offsets the
//! loader computes here and writes into their read-only data. Nothing is hard-coded: the layout
//! of `task_struct` changes with every kernel version and config.

use std::path::Path;

use btf_rs::{Btf, BtfType, Type};
use monitor_common::KernelOffsets;

/// Where the running kernel publishes its BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error(
        "cannot read kernel BTF at {path}: {source}; forkwatch needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 5.x are)"
    )]
    Unreadable { path: String, source: btf_rs::Error },
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

/// Reads the offsets the programs need from the BTF file at `path`.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, OffsetError> {
    let btf = Btf::from_file(path).map_err(|source| OffsetError::Unreadable {
        path: path.display().to_string(),
        source,
    })?;
    let finder = OffsetFinder { btf: &btf };
    Ok(KernelOffsets {
        task_pid: finder.offset("task_struct", "pid")?,
        task_tgid: finder.offset("task_struct", "tgid")?,
        task_mm: finder.offset("task_struct", "mm")?,
        task_signal: finder.offset("task_struct", "signal")?,
        task_start_boottime: finder.offset("task_struct", "start_boottime")?,
        task_exit_code: finder.offset("task_struct", "exit_code")?,
        signal_nr_threads: finder.offset("signal_struct", "nr_threads")?,
        regs_syscall_nr: finder.offset("pt_regs", SYSCALL_REGS[0])?,
        regs_arg1: finder.offset("pt_regs", SYSCALL_REGS[1])?,
        regs_arg2: finder.offset("pt_regs", SYSCALL_REGS[2])?,
        regs_arg4: finder.offset("pt_regs", SYSCALL_REGS[3])?,
        regs_arg5: finder.offset("pt_regs", SYSCALL_REGS[4])?,
    })
}

/// `struct pt_regs` members with the syscall number and arguments 1, 2, 4, 5 (the x86_64 syscall
/// ABI: rdi, rsi, rdx, r10, r8, r9; the number in orig_ax). Other architectures name them
/// differently (arm64 keeps them in an array), and are not supported yet.
#[cfg(target_arch = "x86_64")]
const SYSCALL_REGS: [&str; 5] = ["orig_ax", "di", "si", "r10", "r8"];
#[cfg(not(target_arch = "x86_64"))]
compile_error!("forkwatch reads syscall registers from x86_64 pt_regs; port SYSCALL_REGS first");

struct OffsetFinder<'a> {
    btf: &'a Btf,
}

impl OffsetFinder<'_> {
    /// Byte offset of `member` in `struct strukt`, looking through anonymous structs and unions
    /// (task_struct nests many of its members in them, depending on config).
    fn offset(&self, strukt: &str, member: &str) -> Result<u32, OffsetError> {
        let types = self
            .btf
            .resolve_types_by_name(strukt)
            .map_err(|_| OffsetError::NoStruct(strukt.to_owned()))?;
        // The name may also belong to a forward declaration or a function; take the struct with
        // members (a definition), never an empty forward one.
        let definition = types.into_iter().find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        });
        let definition = definition.ok_or_else(|| OffsetError::NoStruct(strukt.to_owned()))?;
        let (bits, bitfield) =
            self.find_bits(&definition, member)
                .ok_or_else(|| OffsetError::NoMember {
                    strukt: strukt.to_owned(),
                    member: member.to_owned(),
                })?;
        if bitfield || bits % 8 != 0 {
            return Err(OffsetError::Unaligned {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            });
        }
        u32::try_from(bits / 8).map_err(|_| OffsetError::TooFar {
            strukt: strukt.to_owned(),
            member: member.to_owned(),
            offset: bits / 8,
        })
    }

    /// Bit offset of `member` within `strukt`, recursing into anonymous members, and whether
    /// the member is a bitfield.
    fn find_bits(&self, strukt: &btf_rs::Struct, member: &str) -> Option<(u64, bool)> {
        for m in &strukt.members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            if name == member {
                let bitfield = m.bitfield_size().is_some_and(|size| size != 0);
                return Some((u64::from(m.bit_offset()), bitfield));
            }
            if name.is_empty()
                && let Some(inner) = self.aggregate_of(m)
                && let Some((bits, bitfield)) = self.find_bits(&inner, member)
            {
                return Some((u64::from(m.bit_offset()) + bits, bitfield));
            }
        }
        None
    }

    /// The struct or union a member's type resolves to, through typedefs and qualifiers.
    fn aggregate_of(&self, member: &dyn BtfType) -> Option<btf_rs::Struct> {
        let mut t = self.btf.resolve_chained_type(member).ok()?;
        for _ in 0..16 {
            t = match t {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(x) => self.btf.resolve_chained_type(&x).ok()?,
                Type::Const(x) => self.btf.resolve_chained_type(&x).ok()?,
                Type::Volatile(x) => self.btf.resolve_chained_type(&x).ok()?,
                Type::TypeTag(x) => self.btf.resolve_chained_type(&x).ok()?,
                _ => return None,
            };
        }
        None
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
    }

    #[test]
    fn missing_btf_names_the_fix() {
        let err = kernel_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
