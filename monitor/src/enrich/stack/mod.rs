//! User-space call stacks, from two sources that share one unwinder.
//!
//! - A thread blocked in a syscall (say, a futex wait on a lock inherited across `fork`) holds
//!   still, so its user registers and stack can be read from the outside without ptrace: the
//!   kernel exposes the user sp and pc in `/proc/<pid>/task/<tid>/syscall`, and the stack words
//!   are readable through `/proc/<pid>/mem` ([`blocked_thread_stack`]).
//! - A forking thread has moved on by the time the daemon looks, so the kernel copies its
//!   registers and the top of its stack at the fork ([`CapturedStack`], from a
//!   `ForkStackEvent`); the walk reads that copy and nothing beyond it ([`captured_stack`]).
//!
//! Debian's glibc is built without frame pointers, so the stack is walked with the modules'
//! `.eh_frame` CFI (framehop), then every frame is symbolized (blazesym).

// Only the x86_64 path uses the parsing helpers; elsewhere the API just reports the arch.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use std::fs::File;
use std::io;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

/// One frame of a user stack.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Frame {
    /// Instruction address in the process (the pc for frame 0, the return address for callers).
    pub address: u64,
    /// Function name, demangled, when a symbol covers the address.
    pub function: Option<String>,
    /// File name (not the full path) of the module (executable or shared library), e.g. "libc.so.6".
    pub module: Option<String>,
    /// Offset of the address into the function when `function` is known, else into the module (file offset-based / module-relative).
    pub offset: u64,
    /// Source file and line of the address, where the module has debug info (only asked for
    /// fork stacks: reading DWARF costs, and a blocked thread's frames are named well enough).
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// A thread's registers and a copy of the top of its stack, taken by the kernel at a fork
/// (`ForkStackEvent`): what [`captured_stack`] unwinds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CapturedStack {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// The user address of `bytes[0]`.
    pub base: u64,
    pub bytes: Vec<u8>,
}

impl CapturedStack {
    /// The 8-byte word at user address `addr`, if the copy holds all of it.
    pub(crate) fn word(&self, addr: u64) -> Option<u64> {
        let start = usize::try_from(addr.checked_sub(self.base)?).ok()?;
        let bytes = self.bytes.get(start..start.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// Only constructed off x86_64; kept everywhere so callers match the same enum.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    #[error("user stack unwinding is only implemented for x86_64")]
    UnsupportedArchitecture,
    #[error("invalid process or thread id 0")]
    InvalidId,
    #[error("cannot read {path}: {source}")]
    Proc {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("thread {tid} is not blocked in a syscall from user space ({path} reads {line:?})")]
    NotBlocked {
        tid: u32,
        path: String,
        line: String,
    },
    #[error("cannot parse {path}: {line:?}")]
    MalformedSyscall { path: String, line: String },
    #[error("unwinding took longer than {0:?}; the stack is left out")]
    TimedOut(Duration),
    #[error("{MAX_IN_FLIGHT} earlier unwinds have not finished; the stack is left out")]
    Busy,
    #[error("the daemon is stopping")]
    Cancelled,
    #[error("no frame could be unwound")]
    Empty,
}

/// How long one stack may take to unwind and symbolize. Cold symbolization of a large binary
/// with debug info takes a few hundred milliseconds; the budget is for what must never happen.
pub const UNWIND_BUDGET: Duration = Duration::from_secs(3);

/// Reads of other processes still running on threads of their own (unwinds, and the lock reads
/// of enrich/lock_owner.rs, through [`within`]). Past MAX_IN_FLIGHT a finding goes without
/// rather than another thread: whatever holds them up, it cannot pile up threads.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
const MAX_IN_FLIGHT: usize = 2;
/// Set when the daemon stops: nothing waits for an unwind any more.
static CANCELLED: AtomicBool = AtomicBool::new(false);

/// [`blocked_thread_stack`] on a thread of its own, waited for at most `budget` (and not at
/// all once [`cancel`] was called): the traced process is another user's, and nothing it does
/// to its files or memory may hold up the event loop or the daemon's exit.
pub fn blocked_thread_stack_within(
    pid: u32,
    tid: u32,
    max_frames: usize,
    budget: Duration,
) -> Result<Vec<Frame>, StackError> {
    within(budget, move || blocked_thread_stack(pid, tid, max_frames))
}

/// Runs `read` (a read of another process's memory or files) on a thread of its own, waited for
/// at most `budget` and not at all once [`cancel`] was called: a page of its memory can be
/// backed by a file whose server never answers, and that must not hold up the event loop.
pub fn within<T: Send + 'static>(
    budget: Duration,
    read: impl FnOnce() -> Result<T, StackError> + Send + 'static,
) -> Result<T, StackError> {
    if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        return Err(StackError::Busy);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let spawned = std::thread::Builder::new()
        .name("fw-unwind".into())
        .spawn(move || {
            let _ = tx.send(read());
            IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(source) = spawned {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        return Err(StackError::Proc {
            path: "a thread for unwinding".into(),
            source,
        });
    }
    let started = Instant::now();
    loop {
        if CANCELLED.load(Ordering::Acquire) {
            return Err(StackError::Cancelled);
        }
        match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(result) => return result,
            Err(RecvTimeoutError::Timeout) if started.elapsed() < budget => {}
            Err(RecvTimeoutError::Timeout) => return Err(StackError::TimedOut(budget)),
            Err(RecvTimeoutError::Disconnected) => return Err(StackError::Cancelled),
        }
    }
}

/// Stops every wait for an unwind, now and later: called as the daemon stops, so that SIGTERM
/// is never held up by a target process.
pub fn cancel() {
    CANCELLED.store(true, Ordering::Release);
}

/// Unwinds the user stack of thread `tid` of process `pid` (blocked in a syscall) from the
/// registers in /proc/<pid>/task/<tid>/syscall (its last two fields are the user sp and pc) and the
/// stack memory read from /proc/<pid>/mem, using the modules' .eh_frame CFI (framehop), then
/// symbolizes every frame (blazesym). At most `max_frames` frames, innermost first.
pub fn blocked_thread_stack(
    pid: u32,
    tid: u32,
    max_frames: usize,
) -> Result<Vec<Frame>, StackError> {
    #[cfg(target_arch = "x86_64")]
    {
        imp::blocked_thread_stack(pid, tid, max_frames)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pid, tid, max_frames);
        Err(StackError::UnsupportedArchitecture)
    }
}

/// Unwinds a stack the kernel captured in process `pid` (its registers and a copy of the top of
/// its stack, see [`CapturedStack`]), with the modules of `maps` (the text of /proc/<pid>/maps,
/// read while the process had not moved on), then symbolizes every frame with file and line
/// where debug info exists. Stack words outside the copy are not read: the thread has moved on
/// since. Needs the process alive for its mapped files and symbols; at most `max_frames`
/// frames, innermost first.
pub fn captured_stack(
    pid: u32,
    maps: &str,
    stack: &CapturedStack,
    max_frames: usize,
) -> Result<Vec<Frame>, StackError> {
    #[cfg(target_arch = "x86_64")]
    {
        imp::captured_stack(pid, maps, stack, max_frames)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (pid, maps, stack, max_frames);
        Err(StackError::UnsupportedArchitecture)
    }
}

/// "a ← b ← c" using function names (or "module+0xoffset" / "0xaddress" when unknown).
pub fn format_stack(frames: &[Frame]) -> String {
    let names: Vec<String> = frames
        .iter()
        .map(|f| match (&f.function, &f.module) {
            (Some(function), _) => function.clone(),
            (None, Some(module)) => format!("{module}+{:#x}", f.offset),
            (None, None) => format!("{:#x}", f.address),
        })
        .collect();
    names.join(" ← ")
}

/// Registers of a thread sleeping in the kernel, as far as /proc tells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UserRegs {
    sp: u64,
    pc: u64,
}

/// Where the walk starts: the registers the unwinder needs (bp 0 when unknown: any
/// frame-pointer fallback then fails fast instead of following garbage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StartRegs {
    pub(crate) pc: u64,
    pub(crate) sp: u64,
    pub(crate) bp: u64,
}

/// Why a syscall line yielded no registers; the caller turns this into a `StackError`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SyscallLine {
    NotBlocked,
    Malformed,
}

/// Parses `/proc/<pid>/task/<tid>/syscall`: `nr a0 a1 a2 a3 a4 a5 sp pc` while in a syscall,
/// `-1 sp pc` when blocked outside one (e.g. in a page fault: the user registers are just as
/// still, so it is accepted), `running` otherwise.
pub(crate) fn parse_syscall_line(line: &str) -> Result<UserRegs, SyscallLine> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let valid_len = match fields.first() {
        None => return Err(SyscallLine::Malformed),
        Some(&"running") => return Err(SyscallLine::NotBlocked),
        Some(&"-1") => 3,
        Some(nr) if nr.parse::<u64>().is_ok() => 9,
        Some(_) => return Err(SyscallLine::Malformed),
    };
    if fields.len() < valid_len {
        return Err(SyscallLine::NotBlocked);
    }
    let hex = |s: &str| u64::from_str_radix(s.strip_prefix("0x")?, 16).ok();
    let (Some(sp), Some(pc)) = (hex(fields[valid_len - 2]), hex(fields[valid_len - 1])) else {
        return Err(SyscallLine::Malformed);
    };
    // Kernel threads have no user registers: nothing to unwind.
    if sp == 0 || pc == 0 {
        return Err(SyscallLine::NotBlocked);
    }
    Ok(UserRegs { sp, pc })
}

/// One line of /proc/<pid>/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    start: u64,
    end: u64,
    executable: bool,
    /// File offset of `start`.
    offset: u64,
    inode: u64,
    /// Path or pseudo-name ("[vdso]"), possibly suffixed " (deleted)"; None for anonymous memory.
    path: Option<String>,
}

impl Mapping {
    /// File name shown in frames: the last path component, or the pseudo-name itself.
    fn module_name(&self) -> Option<String> {
        let path = self.path.as_deref()?;
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        let name = path.rsplit('/').next().unwrap_or(path);
        (!name.is_empty()).then(|| name.to_string())
    }

    fn contains(&self, address: u64) -> bool {
        (self.start..self.end).contains(&address)
    }
}

/// The lines of a /proc/<pid>/maps text that parse; the others are skipped.
pub(crate) fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

/// Parses `start-end perms offset dev inode [path]`; None for anything else.
pub(crate) fn parse_maps_line(line: &str) -> Option<Mapping> {
    // The path is the rest of the line after the inode and its padding; it may contain spaces.
    let mut rest = line;
    let mut next_field = || {
        let trimmed = rest.trim_start();
        let end = trimmed.find(' ').unwrap_or(trimmed.len());
        let (field, tail) = trimmed.split_at(end);
        rest = tail;
        (!field.is_empty()).then_some(field)
    };
    let (range, perms, offset, _dev, inode) = (
        next_field()?,
        next_field()?,
        next_field()?,
        next_field()?,
        next_field()?,
    );
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if start >= end {
        return None;
    }
    let path = rest.trim_start();
    Some(Mapping {
        start,
        end,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        inode: inode.parse().ok()?,
        path: (!path.is_empty()).then(|| path.to_string()),
    })
}

/// Reads a /proc file as text; lossy, because mapped file names need not be UTF-8.
fn read_proc(path: String) -> Result<String, StackError> {
    match std::fs::read(&path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(source) => Err(StackError::Proc { path, source }),
    }
}

fn open_proc(path: String) -> Result<File, StackError> {
    File::open(&path).map_err(|source| StackError::Proc { path, source })
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::ops::Range;
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::{FileExt as _, MetadataExt as _};
    use std::path::Path;

    use blazesym::symbolize::source::{Elf, Process, Source};
    use blazesym::symbolize::{Input, Reason, Symbolized, Symbolizer};
    use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
    use framehop::{ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _};
    use object::read::elf::ElfFile64;
    use object::{Object as _, ObjectSection as _, ObjectSegment as _, ReadCache};

    use super::*;

    /// What symbolization needs to know about a loaded module beyond blazesym's own view.
    struct ModuleInfo {
        avma: Range<u64>,
        /// avma - svma.
        bias: u64,
        /// GNU build id, which names the separate debug file.
        build_id: Option<Vec<u8>>,
        /// The mapped file, open: symbols are read from it when the process is gone.
        file: File,
    }

    pub(super) fn blocked_thread_stack(
        pid: u32,
        tid: u32,
        max_frames: usize,
    ) -> Result<Vec<Frame>, StackError> {
        // blazesym reads pid 0 as "this process"; /proc has no task 0 either.
        if pid == 0 || tid == 0 {
            return Err(StackError::InvalidId);
        }
        let path = format!("/proc/{pid}/task/{tid}/syscall");
        let line = read_proc(path.clone())?;
        let line = line.trim().to_string();
        let regs = parse_syscall_line(&line).map_err(|why| match why {
            SyscallLine::NotBlocked => StackError::NotBlocked { tid, path, line },
            SyscallLine::Malformed => StackError::MalformedSyscall { path, line },
        })?;
        let path = format!("/proc/{pid}/maps");
        let maps = crate::enrich::procfs::read_maps(Path::new(&path))
            .map_err(|source| StackError::Proc { path, source })?;
        let maps = parse_maps(&maps);
        let mem = open_proc(format!("/proc/{pid}/mem"))?;
        let (unwinder, modules) = unwinder_for(pid, &maps);
        let read_stack = |addr: u64| {
            let mut word = [0u8; 8];
            mem.read_exact_at(&mut word, addr).map_err(|_| ())?;
            Ok(u64::from_le_bytes(word))
        };
        // bp is not in /proc/.../syscall. Code with CFI does not need it unless its CFA is
        // rbp-based.
        let start = StartRegs {
            pc: regs.pc,
            sp: regs.sp,
            bp: 0,
        };
        let addresses = unwind(&unwinder, start, read_stack, max_frames);
        Ok(symbolize(pid, &addresses, &maps, &modules, false))
    }

    pub(super) fn captured_stack(
        pid: u32,
        maps: &str,
        stack: &CapturedStack,
        max_frames: usize,
    ) -> Result<Vec<Frame>, StackError> {
        if pid == 0 {
            return Err(StackError::InvalidId);
        }
        let maps = parse_maps(maps);
        let (unwinder, modules) = unwinder_for(pid, &maps);
        let start = StartRegs {
            pc: stack.ip,
            sp: stack.sp,
            bp: stack.bp,
        };
        let addresses = unwind(
            &unwinder,
            start,
            |addr| stack.word(addr).ok_or(()),
            max_frames,
        );
        if addresses.is_empty() {
            return Err(StackError::Empty);
        }
        Ok(symbolize(pid, &addresses, &maps, &modules, true))
    }

    /// The framehop unwinder over every executable mapping of `maps` whose file and CFI could
    /// be read, with what symbolization needs to know about each.
    fn unwinder_for(pid: u32, maps: &[Mapping]) -> (UnwinderX86_64<Vec<u8>>, Vec<ModuleInfo>) {
        let mut unwinder = UnwinderX86_64::<Vec<u8>>::new();
        let mut modules = Vec::new();
        for mapping in maps.iter().filter(|m| m.executable) {
            if let Some((module, info)) = load_module(pid, mapping) {
                unwinder.add_module(module);
                modules.push(info);
            }
        }
        (unwinder, modules)
    }

    /// Walks the stack with CFI from `regs`, reading stack words through `read_stack`; returns
    /// the pc followed by return addresses (empty for a pc of 0).
    pub(crate) fn unwind(
        unwinder: &UnwinderX86_64<Vec<u8>>,
        regs: StartRegs,
        mut read_stack: impl FnMut(u64) -> Result<u64, ()>,
        max: usize,
    ) -> Vec<u64> {
        if regs.pc == 0 || max == 0 {
            return Vec::new();
        }
        let mut cache = CacheX86_64::new();
        let mut uregs = UnwindRegsX86_64::new(regs.pc, regs.sp, regs.bp);
        let mut frame = FrameAddress::InstructionPointer(regs.pc);
        let mut addresses = vec![regs.pc];
        while addresses.len() < max {
            let sp_before = uregs.sp();
            let return_address =
                match unwinder.unwind_frame(frame, &mut uregs, &mut cache, &mut read_stack) {
                    Ok(Some(ra)) => ra,
                    // Ok(None): the CFI marks the outermost frame (e.g. _start).
                    Ok(None) | Err(_) => break,
                };
            // Stacks grow down, so each caller's sp must be above its callee's; anything else is
            // a corrupt stack or a loop.
            if uregs.sp() <= sp_before {
                break;
            }
            let Some(next) = FrameAddress::from_return_address(return_address) else {
                break; // a zero return address ends the chain
            };
            addresses.push(return_address);
            frame = next;
        }
        addresses.truncate(max);
        addresses
    }

    /// Builds the framehop module for one executable mapping; None when its file or CFI is
    /// unavailable (frames in it then end the walk, which beats a wrong stack).
    fn load_module(pid: u32, mapping: &Mapping) -> Option<(Module<Vec<u8>>, ModuleInfo)> {
        let file = open_mapped_file(pid, mapping)?;
        // ReadCache reads only the headers and the sections asked for, not the whole (possibly
        // huge) file, and bounds-checks every read against the file size.
        let data = ReadCache::new(file.try_clone().ok()?);
        let elf = ElfFile64::<object::Endianness, _>::parse(&data).ok()?;

        // The executable PT_LOAD segment that this mapping was created from gives the load
        // bias: file offset X lives at start + (X - offset) in memory and at
        // p_vaddr + (X - p_offset) in the ELF, so bias = start - offset + p_offset - p_vaddr.
        let map_len = mapping.end - mapping.start;
        let segment = elf.segments().find(|s| {
            let (p_offset, p_filesz) = s.file_range();
            s.permissions().executable()
                && p_offset < mapping.offset.saturating_add(map_len)
                && mapping.offset < p_offset.saturating_add(p_filesz)
        })?;
        let (p_offset, _) = segment.file_range();
        let bias = mapping
            .start
            .checked_sub(mapping.offset)?
            .checked_add(p_offset)?
            .checked_sub(segment.address())?;

        let range = |name: &str| -> Option<Range<u64>> {
            let s = elf.section_by_name(name)?;
            Some(s.address()..s.address().checked_add(s.size())?)
        };
        // The section headers are the process owner's to write: a size is believed only up to
        // MAX_SECTION_BYTES (the file may be sparse, and ReadCache allocates what it is told).
        let bytes = |name: &str| {
            let s = elf.section_by_name(name)?;
            if s.size() > MAX_SECTION_BYTES {
                return None;
            }
            Some(s.data().ok()?.to_vec())
        };
        // For ELF, framehop's svma base is 0 and module-relative addresses are svmas; the
        // section addresses resolve pc-/text-/data-relative pointer encodings in the CFI.
        // .text bytes are only used for Mach-O prologue analysis, so they are not loaded.
        let sections = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: range(".text"),
            got_svma: range(".got"),
            eh_frame_svma: range(".eh_frame"),
            eh_frame: bytes(".eh_frame"),
            eh_frame_hdr_svma: range(".eh_frame_hdr"),
            eh_frame_hdr: bytes(".eh_frame_hdr"),
            ..Default::default()
        };
        let avma = mapping.start..mapping.end;
        let name = mapping.path.clone().unwrap_or_default();
        let module = Module::new(name, avma.clone(), bias, sections);
        let build_id = elf.build_id().ok().flatten().map(<[u8]>::to_vec);
        Some((
            module,
            ModuleInfo {
                avma,
                bias,
                build_id,
                file,
            },
        ))
    }

    /// Opens the file behind a mapping, or None: its path and contents are the traced process's
    /// to choose, so nothing is trusted. /proc/<pid>/map_files/ is the mapped file itself (it
    /// needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE); without it, the path is resolved inside
    /// the process's root (containers) with no symlink leading out of it and none at the end;
    /// for a process already gone (a fork's parent that exited), on the host.
    /// Either way the file must be a regular file with the mapped inode, and it is opened
    /// without blocking: a FIFO named like the mapped file must not stall the daemon.
    fn open_mapped_file(pid: u32, mapping: &Mapping) -> Option<File> {
        let is_mapped_file = |f: &File| {
            f.metadata()
                .is_ok_and(|m| m.file_type().is_file() && m.ino() == mapping.inode)
        };
        let map_file = format!(
            "/proc/{pid}/map_files/{:x}-{:x}",
            mapping.start, mapping.end
        );
        if let Some(file) = open_nonblocking(Path::new(&map_file)).filter(is_mapped_file) {
            return Some(file);
        }
        let path = mapping.path.as_deref().filter(|p| p.starts_with('/'))?;
        open_in_root(pid, path)
            .or_else(|| open_on_host(path, mapping.inode))
            .filter(is_mapped_file)
    }

    /// Names every address; symbolization failures leave `function` empty rather than
    /// losing the unwound stack.
    fn symbolize(
        pid: u32,
        addresses: &[u64],
        maps: &[Mapping],
        modules: &[ModuleInfo],
        code_info: bool,
    ) -> Vec<Frame> {
        if addresses.is_empty() {
            return Vec::new();
        }
        // A return address points after the call, possibly past the end of the caller (calls
        // to noreturn functions), so callers are looked up one byte earlier.
        let lookups: Vec<u64> = addresses
            .iter()
            .enumerate()
            .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
            .collect();
        let symbolizer = Symbolizer::builder()
            .enable_code_info(code_info)
            .enable_inlined_fns(false)
            .build();
        let process = |debug_syms: bool| {
            let mut process = Process::new(pid.into());
            process.debug_syms = debug_syms;
            // perf maps describe JIT code, which has no CFI to get here; skip reading them.
            process.perf_map = false;
            Source::Process(process)
        };
        // A module whose debug info blazesym cannot read (Debian's libc6-dbg ships
        // zlib-compressed DWARF, and blazesym's zlib feature is off) fails the whole batch.
        // Then name each address on its own, falling back to the ELF symbol tables.
        let single = |source: &Source, input| {
            symbolizer
                .symbolize_single(source, input)
                .unwrap_or(Symbolized::Unknown(Reason::IgnoredError))
        };
        let mut symbols = symbolizer
            .symbolize(&process(true), Input::AbsAddr(&lookups))
            .unwrap_or_else(|_| {
                let (with_dwarf, without) = (process(true), process(false));
                lookups
                    .iter()
                    .map(|&addr| match single(&with_dwarf, Input::AbsAddr(addr)) {
                        Symbolized::Unknown(_) => single(&without, Input::AbsAddr(addr)),
                        found => found,
                    })
                    .collect()
            });
        // What the process source left unnamed is looked up in the module's file itself, which
        // is open: a process gone by now (a fork's parent that exited) has no /proc entry left
        // to symbolize through. First with its DWARF (if asked for), then its .symtab alone, in
        // a symbolizer of its own (blazesym caches a module's resolver, and a DWARF one does
        // not fall back to the symbol table: seen with a DWARF 5 libpython built by pyenv).
        let symtab_only = Symbolizer::builder()
            .enable_code_info(false)
            .enable_inlined_fns(false)
            .build();
        for (symbol, &lookup) in symbols.iter_mut().zip(&lookups) {
            if matches!(symbol, Symbolized::Sym(_)) {
                continue;
            }
            let Some(module) = modules.iter().find(|m| m.avma.contains(&lookup)) else {
                continue;
            };
            let Some(svma) = lookup.checked_sub(module.bias) else {
                continue;
            };
            let path = format!("/proc/self/fd/{}", module.file.as_raw_fd());
            let elf = |debug_syms: bool| {
                let mut elf = Elf::new(&path);
                elf.debug_syms = debug_syms;
                Source::Elf(elf)
            };
            let attempts = [(&symbolizer, true), (&symtab_only, false)];
            if let Some(found) = attempts.iter().find_map(|(by, debug_syms)| {
                match by.symbolize_single(&elf(*debug_syms), Input::VirtOffset(svma)) {
                    Ok(found @ Symbolized::Sym(_)) => Some(found),
                    _ => None,
                }
            }) {
                *symbol = found;
                continue;
            }
            // Stripped libraries keep only exported symbols (glibc's __lll_lock_wait is not
            // one). The separate debug file named by the build id still has the full .symtab,
            // readable even when its DWARF is not.
            if let Some(path) = module
                .build_id
                .as_deref()
                .and_then(|id| debug_file(pid, id))
            {
                let mut elf = Elf::new(&path.path);
                elf.debug_syms = false;
                *symbol = single(&Source::Elf(elf), Input::VirtOffset(svma));
            }
        }

        addresses
            .iter()
            .zip(&lookups)
            .zip(&symbols)
            .map(|((&address, &lookup), symbol)| {
                let mapping = maps.iter().find(|m| m.contains(lookup));
                let module = mapping.and_then(Mapping::module_name);
                match symbol {
                    Symbolized::Sym(sym) => {
                        let code = sym.code_info.as_deref();
                        Frame {
                            address,
                            function: Some(sym.name.to_string()),
                            module,
                            offset: sym.offset as u64 + (address - lookup),
                            file: code.map(|c| c.to_path().display().to_string()),
                            line: code.and_then(|c| c.line),
                        }
                    }
                    Symbolized::Unknown(_) => Frame {
                        address,
                        function: None,
                        offset: mapping.map_or(0, |m| (address - m.start).saturating_add(m.offset)),
                        module,
                        file: None,
                        line: None,
                    },
                }
            })
            .collect()
    }

    /// The debug file for a build id, as installed by Debian's -dbg/-dbgsym packages: first in
    /// the process's own mount namespace, then on the host (the build id makes either match).
    /// One in the process's namespace is opened as a mapped file is (open_in_root), and handed
    /// to blazesym as /proc/self/fd/N, which is that very regular file.
    fn debug_file(pid: u32, build_id: &[u8]) -> Option<DebugFile> {
        let (first, rest) = build_id.split_first()?;
        let rest: String = rest.iter().map(|b| format!("{b:02x}")).collect();
        let path = format!("/usr/lib/debug/.build-id/{first:02x}/{rest}.debug");
        if let Some(file) =
            open_in_root(pid, &path).filter(|f| f.metadata().is_ok_and(|m| m.is_file()))
        {
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            return Some(DebugFile {
                path,
                _file: Some(file),
            });
        }
        Path::new(&path)
            .is_file()
            .then_some(DebugFile { path, _file: None })
    }

    /// A debug file's path, and the open file it names while that path is /proc/self/fd/N.
    struct DebugFile {
        path: String,
        _file: Option<File>,
    }
}

/// Most bytes read of one ELF section (.eh_frame, .eh_frame_hdr). The largest real ones are a
/// few MiB (a browser's libxul); beyond this, the module's frames end the walk.
const MAX_SECTION_BYTES: u64 = 64 << 20;

/// Opens `path` read-only, close-on-exec and without blocking (a FIFO or a device answers at
/// once instead of waiting for a writer), not following a symlink at its end.
fn open_nonblocking(path: &Path) -> Option<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .ok()
}

/// `struct open_how` of openat2(2) (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens the absolute `path` as process `pid` sees it: resolved inside /proc/<pid>/root, where
/// an absolute symlink would otherwise resolve against the daemon's own root. openat2 with
/// RESOLVE_IN_ROOT keeps every step inside (Linux 5.6+); where it is missing, None.
fn open_in_root(pid: u32, path: &str) -> Option<File> {
    open_resolved(
        &format!("/proc/{pid}/root"),
        path,
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// Opens the absolute `path` in the daemon's own root, but only if it is a regular file with
/// inode `inode` (checked before opening, so that no device is ever opened, and after), through
/// no symlink at all: for a process that has exited, whose /proc root is gone, its mapped files
/// are where a host process's are.
fn open_on_host(path: &str, inode: u64) -> Option<File> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.ino() != inode {
        return None;
    }
    open_resolved(
        "/",
        path,
        libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// Opens `path` (absolute, taken as relative to `root`) read-only and without blocking, with
/// openat2's `resolve` rules.
fn open_resolved(root: &str, path: &str, resolve: u64) -> Option<File> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(root)
        .ok()?;
    let relative = std::ffi::CString::new(path.trim_start_matches('/')).ok()?;
    let how = OpenHow {
        flags: (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: openat2 reads `relative` (NUL-terminated, alive for the call) and `how` (a valid
    // open_how of the size passed); the fd it returns is ours alone and wrapped at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            relative.as_ptr(),
            &raw const how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
    // SAFETY: fd was just returned by openat2 and is owned by nothing else.
    Some(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests;
