//! The parsers of /proc text the unwinder reads (another user's to write), and the unwinder on
//! this very process.

use super::*;

#[test]
fn parses_syscall_lines() {
    let line = "202 0x55d0c0a0 0x80 0x2 0x0 0x0 0x0 0x7ffd12345678 0x7f0123456789\n";
    assert_eq!(
        parse_syscall_line(line),
        Ok(UserRegs {
            sp: 0x7ffd_1234_5678,
            pc: 0x7f01_2345_6789
        })
    );
    assert_eq!(
        parse_syscall_line("-1 0x7ffd00001000 0x401000"),
        Ok(UserRegs {
            sp: 0x7ffd_0000_1000,
            pc: 0x40_1000
        })
    );
    assert_eq!(
        parse_syscall_line("running\n"),
        Err(SyscallLine::NotBlocked)
    );
    assert_eq!(
        parse_syscall_line("202 0x1 0x2"),
        Err(SyscallLine::NotBlocked)
    );
    assert_eq!(parse_syscall_line(""), Err(SyscallLine::Malformed));
    assert_eq!(
        parse_syscall_line("202 0x0 0x0 0x0 0x0 0x0 0x0 zz 0x1"),
        Err(SyscallLine::Malformed)
    );
    assert_eq!(
        parse_syscall_line("0 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0"),
        Err(SyscallLine::NotBlocked)
    );
}

#[test]
fn parses_maps_lines() {
    let line = "7f0123400000-7f0123595000 r-xp 00026000 fd:01 1234567                    /usr/lib/x86_64-linux-gnu/libc.so.6";
    let m = parse_maps_line(line).unwrap();
    assert_eq!(
        m,
        Mapping {
            start: 0x7f01_2340_0000,
            end: 0x7f01_2359_5000,
            executable: true,
            offset: 0x26000,
            inode: 1_234_567,
            path: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
        }
    );
    assert_eq!(m.module_name().as_deref(), Some("libc.so.6"));

    let anon = parse_maps_line("7ffd0000-7ffd1000 rw-p 00000000 00:00 0 ").unwrap();
    assert_eq!(
        (anon.executable, anon.module_name(), anon.path),
        (false, None, None)
    );

    let odd = parse_maps_line("1000-2000 r-xp 0 08:01 42 /tmp/my prog (deleted)").unwrap();
    assert_eq!(odd.module_name().as_deref(), Some("my prog"));
    let vdso = parse_maps_line("1000-2000 r-xp 00000000 00:00 0  [vdso]").unwrap();
    assert_eq!(vdso.module_name().as_deref(), Some("[vdso]"));

    for bad in [
        "",
        "garbage",
        "2000-1000 r-xp 0 0:0 0",
        "1000-zz r-xp 0 0:0 0 /x",
    ] {
        assert_eq!(parse_maps_line(bad), None, "{bad:?}");
    }
}

#[test]
fn formats_frames() {
    let frames = [
        Frame {
            address: 0x10,
            function: Some("f".into()),
            module: Some("a.so".into()),
            offset: 4,
            file: None,
            line: None,
        },
        Frame {
            address: 0x20,
            function: None,
            module: Some("b.so".into()),
            offset: 0x1f,
            file: None,
            line: None,
        },
        Frame {
            address: 0x30,
            function: None,
            module: None,
            offset: 0,
            file: None,
            line: None,
        },
    ];
    assert_eq!(format_stack(&frames), "f ← b.so+0x1f ← 0x30");
    assert_eq!(format_stack(&[]), "");
}

#[test]
fn nonexistent_pid_is_an_error() {
    // Above the kernel's maximum pid_max (2^22), so it cannot exist.
    assert!(blocked_thread_stack(0x7fff_fff0, 0x7fff_fff0, 8).is_err());
    assert!(blocked_thread_stack(0, 0, 8).is_err());
}

#[cfg(target_arch = "x86_64")]
#[test]
fn unwinds_self_deadlocked_c_program() {
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// Kills the child even when an assertion fails.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    const PROGRAM: &str = r#"
#include <pthread.h>
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
__attribute__((noinline)) void holder_path(void) {
pthread_mutex_lock(&lock);
pthread_mutex_lock(&lock); /* non-recursive: blocks forever in futex wait */
__asm__ volatile("" ::: "memory");
}
int main(void) {
holder_path();
return 0;
}
"#;
    let dir = std::env::temp_dir().join(format!("stack-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (source, binary) = (dir.join("deadlock.c"), dir.join("deadlock"));
    std::fs::write(&source, PROGRAM).unwrap();
    let status = Command::new("cc")
        .args(["-O1", "-g", "-pthread", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed");

    let child = KillOnDrop(Command::new(&binary).spawn().unwrap());
    let pid = child.0.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let line = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap();
        if line.split_whitespace().next() == Some("202") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "child never blocked in futex: {line}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let frames = blocked_thread_stack(pid, pid, 32).unwrap();
    drop(child);
    let _ = std::fs::remove_dir_all(&dir);
    let stack = format_stack(&frames);
    println!("{stack}");
    println!("{frames:#x?}");

    let position = |needle: &str, exact: bool| {
        frames
            .iter()
            .position(|f| {
                f.function.as_deref().is_some_and(|n| {
                    if exact {
                        n == needle
                    } else {
                        n.contains(needle)
                    }
                })
            })
            .unwrap_or_else(|| panic!("{needle} not in {stack}"))
    };
    let (lock, holder, main) = (
        position("pthread_mutex_lock", false),
        position("holder_path", true),
        position("main", true),
    );
    assert!(lock < holder && holder < main, "wrong order: {stack}");
    assert_eq!(frames[holder].module.as_deref(), Some("deadlock"));
}

#[test]
fn captured_words_come_from_the_copy_alone() {
    let stack = CapturedStack {
        ip: 1,
        sp: 0x1008,
        bp: 0,
        base: 0x1000,
        bytes: (0u8..32).collect(),
    };
    assert_eq!(stack.word(0x1000), Some(0x0706_0504_0302_0100));
    assert_eq!(stack.word(0x1018), Some(0x1f1e_1d1c_1b1a_1918));
    // Straddling the end, past it, below the base, and an address that overflows.
    for outside in [0x1019, 0x1020, 0xff8, u64::MAX] {
        assert_eq!(stack.word(outside), None, "{outside:#x}");
    }
}

/// A synthetic stack of three frames linked by frame pointers (no module has CFI for these
/// addresses, so framehop follows rbp), whose outermost saved rbp points past the copy: the walk
/// reads the copy alone and stops there.
#[cfg(target_arch = "x86_64")]
#[test]
fn unwinds_a_captured_copy_and_nothing_beyond_it() {
    use framehop::x86_64::UnwinderX86_64;

    let base = 0x7ffd_0000_0000_u64;
    let mut bytes = vec![0u8; 0x400];
    let mut put = |addr: u64, value: u64| {
        let at = (addr - base) as usize;
        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
    };
    // frame 1: [bp] = caller's bp, [bp + 8] = return address into the caller.
    put(base + 0x100, base + 0x200);
    put(base + 0x108, 0x40_1234);
    // frame 2: its saved bp points beyond the copy.
    put(base + 0x200, base + 0x1000);
    put(base + 0x208, 0x40_5678);
    let stack = CapturedStack {
        ip: 0x40_0010,
        sp: base + 0x10,
        bp: base + 0x100,
        base,
        bytes,
    };
    let start = StartRegs {
        pc: stack.ip,
        sp: stack.sp,
        bp: stack.bp,
    };
    let unwinder = UnwinderX86_64::<Vec<u8>>::new();
    let mut outside = 0;
    let addresses = imp::unwind(
        &unwinder,
        start,
        |addr| {
            let word = stack.word(addr);
            outside += usize::from(word.is_none());
            word.ok_or(())
        },
        32,
    );
    assert_eq!(addresses, [0x40_0010, 0x40_1234, 0x40_5678]);
    assert_eq!(
        outside, 1,
        "the walk ends at the first word outside the copy"
    );
    assert!(imp::unwind(&unwinder, StartRegs { pc: 0, ..start }, |_| Err(()), 32).is_empty());
}

/// The fork-stack path end to end on this very process: registers and a copy of the stack
/// taken inside a named function, unwound with the modules' CFI and symbolized against
/// /proc/self/maps.
#[cfg(target_arch = "x86_64")]
#[test]
fn unwinds_and_names_a_captured_copy_of_this_process() {
    #[inline(never)]
    fn capture_here_for_fork_stack_test() -> CapturedStack {
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers into locals; no memory is touched.
        unsafe {
            std::arch::asm!(
                "lea {ip}, [rip]",
                "mov {sp}, rsp",
                "mov {bp}, rbp",
                ip = out(reg) ip,
                sp = out(reg) sp,
                bp = out(reg) bp,
            );
        }
        let base = sp & !0xfff;
        // Through /proc/self/mem: a page past the top of this thread's stack is an error, not
        // a fault.
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        let mut bytes = Vec::new();
        for page in 0..4u64 {
            let mut buf = vec![0u8; 4096];
            if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut buf, base + page * 4096)
                .is_err()
            {
                break;
            }
            bytes.extend(buf);
        }
        std::hint::black_box(CapturedStack {
            ip,
            sp,
            bp,
            base,
            bytes,
        })
    }
    let stack = capture_here_for_fork_stack_test();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let frames = captured_stack(std::process::id(), &maps, &stack, 8).unwrap();
    let summary = format_stack(&frames);
    assert!(
        frames[0]
            .function
            .as_deref()
            .is_some_and(|f| f.contains("capture_here_for_fork_stack_test")),
        "{summary}"
    );
    assert!(
        frames.iter().any(|f| f
            .function
            .as_deref()
            .is_some_and(|f| f.contains("unwinds_and_names_a_captured_copy_of_this_process"))),
        "the caller comes from the copy: {summary}"
    );
    assert!(
        frames[0].line.is_some(),
        "the test binary has debug info: {frames:?}"
    );
}
