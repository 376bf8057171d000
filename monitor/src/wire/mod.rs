//! Ring-buffer records → [`Event`]s. A record is untrusted bytes: a short, unknown or malformed
//! one is an error value, never a panic.

pub mod event;

use std::mem::size_of;

use std::net::{Ipv4Addr, Ipv6Addr};

use monitor_common::{
    COMM_LEN, DIRECTION_SEND, EventKind, ExecEvent, ExitEvent, FORK_FLAG_IN_TREE,
    FORK_FLAG_SHARES_VM, FORK_FLAG_STACK, FORK_FLAG_STACK_SKIPPED, FORK_STACK_PAGE_BYTES,
    FORK_STACK_PAGES, ForkEvent, ForkStackEvent, SharedFileEvent, SharedSocketEvent, ThreadEvent,
    linux::{AF_INET, AF_INET6, AF_UNIX},
};

use crate::{
    enrich::stack::CapturedStack,
    wire::event::{
        Event, Exec, Exit, Fork, ForkStack, ResourceUse, SharedFile, SharedSocket, StackKey,
        ThreadChange,
    },
};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("record of {0} bytes is too short for an event tag")]
    NoTag(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record is {got} bytes, expected at least {want}")]
    Short {
        kind: EventKind,
        got: usize,
        want: usize,
    },
}

pub fn decode(record: &[u8]) -> Result<Event, DecodeError> {
    let tag: [u8; 4] = record
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::NoTag(record.len()))?;
    let raw_kind = u32::from_ne_bytes(tag);
    let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    Ok(match kind {
        EventKind::Fork => {
            let e: ForkEvent = read(kind, record)?;
            Event::Fork(Fork {
                parent_pid: e.parent_tgid,
                parent_tid: e.parent_tid,
                child_pid: e.child_pid,
                parent_threads: e.parent_threads,
                shares_vm: e.flags & FORK_FLAG_SHARES_VM != 0,
                timestamp_ns: e.timestamp_ns,
                child_start_ns: e.child_start_ns,
                parent_start_ns: e.parent_start_ns,
                cgroup_id: e.cgroup_id,
                in_tree: e.flags & FORK_FLAG_IN_TREE != 0,
                comm: comm_to_string(&e.comm),
                stack: (e.flags & FORK_FLAG_STACK != 0).then_some(StackKey {
                    pid: e.parent_tgid,
                    tid: e.parent_tid,
                    parent_start_ns: e.parent_start_ns,
                    ip: e.stack_ip,
                    sp: e.stack_sp,
                    site: e.stack_site,
                }),
                stack_skipped: e.flags & FORK_FLAG_STACK_SKIPPED != 0,
            })
        }
        EventKind::ForkStack => {
            // 16 KiB: read in place rather than copied whole onto the stack as a value.
            let header = std::mem::offset_of!(ForkStackEvent, stack);
            if record.len() < size_of::<ForkStackEvent>() {
                return Err(DecodeError::Short {
                    kind,
                    got: record.len(),
                    want: size_of::<ForkStackEvent>(),
                });
            }
            let word =
                |at: usize| u64::from_ne_bytes(record[at..at + 8].try_into().unwrap_or([0; 8]));
            let half =
                |at: usize| u32::from_ne_bytes(record[at..at + 4].try_into().unwrap_or([0; 4]));
            let pages =
                (half(std::mem::offset_of!(ForkStackEvent, pages)) as usize).min(FORK_STACK_PAGES);
            let key = StackKey {
                pid: half(std::mem::offset_of!(ForkStackEvent, tgid)),
                tid: half(std::mem::offset_of!(ForkStackEvent, tid)),
                parent_start_ns: word(std::mem::offset_of!(ForkStackEvent, parent_start_ns)),
                ip: word(std::mem::offset_of!(ForkStackEvent, ip)),
                sp: word(std::mem::offset_of!(ForkStackEvent, sp)),
                site: word(std::mem::offset_of!(ForkStackEvent, site)),
            };
            Event::ForkStack(ForkStack {
                key,
                timestamp_ns: word(std::mem::offset_of!(ForkStackEvent, timestamp_ns)),
                stack: CapturedStack {
                    ip: key.ip,
                    sp: key.sp,
                    bp: word(std::mem::offset_of!(ForkStackEvent, bp)),
                    base: word(std::mem::offset_of!(ForkStackEvent, base)),
                    bytes: record[header..header + pages * FORK_STACK_PAGE_BYTES].to_vec(),
                },
            })
        }
        EventKind::Exec => {
            let e: ExecEvent = read(kind, record)?;
            Event::Exec(Exec {
                pid: e.pid,
                timestamp_ns: e.timestamp_ns,
                comm: comm_to_string(&e.comm),
            })
        }
        EventKind::Exit => {
            let e: ExitEvent = read(kind, record)?;
            Event::Exit(Exit {
                pid: e.pid,
                timestamp_ns: e.timestamp_ns,
                exit_code: e.exit_code,
            })
        }
        EventKind::ThreadCreated | EventKind::ThreadExited => {
            let e: ThreadEvent = read(kind, record)?;
            Event::Thread(ThreadChange {
                pid: e.pid,
                tid: e.tid,
                created: kind == EventKind::ThreadCreated,
                timestamp_ns: e.timestamp_ns,
            })
        }
        EventKind::SharedSocket => {
            let e: SharedSocketEvent = read(kind, record)?;
            let (local, peer) = endpoints(&e);
            Event::SharedSocket(SharedSocket {
                family: e.family,
                first: ResourceUse {
                    pid: e.other_pid,
                    syscall: e.other_syscall,
                    send: e.other_direction == DIRECTION_SEND,
                    timestamp_ns: e.other_timestamp_ns,
                },
                later: ResourceUse {
                    pid: e.pid,
                    syscall: e.syscall,
                    send: e.direction == DIRECTION_SEND,
                    timestamp_ns: e.timestamp_ns,
                },
                inode: e.inode,
                cgroup_id: e.cgroup_id,
                in_tree: e.in_tree != 0,
                sk_family: e.sk_family,
                sk_type: e.sk_type,
                state: e.state,
                local,
                peer,
                comm: comm_to_string(&e.comm),
            })
        }
        EventKind::SharedFile => {
            let e: SharedFileEvent = read(kind, record)?;
            let writer = |pid, syscall, timestamp_ns| ResourceUse {
                pid,
                syscall,
                send: true,
                timestamp_ns,
            };
            Event::SharedFile(SharedFile {
                family: e.family,
                first: writer(e.other_pid, e.other_syscall, e.other_timestamp_ns),
                later: writer(e.pid, e.syscall, e.timestamp_ns),
                fd: e.fd,
                inode: e.inode,
                cgroup_id: e.cgroup_id,
                in_tree: e.in_tree != 0,
                comm: comm_to_string(&e.comm),
            })
        }
    })
}

/// Copies a `T` out of the record after checking its length.
fn read<T: aya::Pod>(kind: EventKind, record: &[u8]) -> Result<T, DecodeError> {
    let want = size_of::<T>();
    if record.len() < want {
        return Err(DecodeError::Short {
            kind,
            got: record.len(),
            want,
        });
    }
    // SAFETY: the length is checked above, `T: Pod` accepts any bit pattern, and
    // `read_unaligned` makes no assumption about the record's alignment.
    Ok(unsafe { record.as_ptr().cast::<T>().read_unaligned() })
}

/// The local and peer addresses as people write them.
fn endpoints(e: &SharedSocketEvent) -> (String, String) {
    match e.sk_family {
        AF_INET => {
            let ip = |a: &[u8; 16]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            (
                format!("{}:{}", ip(&e.local_addr), e.local_port),
                format!("{}:{}", ip(&e.peer_addr), e.peer_port),
            )
        }
        AF_INET6 => (
            format!("[{}]:{}", Ipv6Addr::from(e.local_addr), e.local_port),
            format!("[{}]:{}", Ipv6Addr::from(e.peer_addr), e.peer_port),
        ),
        AF_UNIX => (unix_path(&e.local_path), unix_path(&e.peer_path)),
        _ => (String::new(), String::new()),
    }
}

/// A sun_path as the kernel program copied it: up to the NUL; an abstract name (leading NUL, then
/// the name up to its next NUL) is shown as "@name" like ss(8) does. The program zeroes the whole
/// array first, so the bytes after a name are never an older record's.
fn unix_path(raw: &[u8]) -> String {
    match raw.split_first() {
        None => String::new(),
        Some((0, rest)) if rest.first().is_some_and(|&b| b != 0) => {
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            format!("@{}", String::from_utf8_lossy(&rest[..end]))
        }
        Some(_) => {
            let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        }
    }
}

/// A kernel comm: up to the first NUL, non-UTF-8 bytes replaced (the sinks escape the rest).
pub fn comm_to_string(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// Views a wire struct as its bytes, for building records in tests.
#[cfg(test)]
pub(crate) fn as_bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` is plain data with no padding holes of undefined content in our types.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fork_record() -> ForkEvent {
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        ForkEvent {
            kind: EventKind::Fork as u32,
            parent_tgid: 100,
            parent_tid: 101,
            child_pid: 200,
            parent_threads: 3,
            flags: 0,
            timestamp_ns: 5_000,
            child_start_ns: 4_999,
            parent_start_ns: 1_000,
            cgroup_id: 7,
            comm,
            stack_ip: 0,
            stack_sp: 0,
            stack_site: 0,
        }
    }

    fn fork_stack_record(pages: u32) -> Vec<u8> {
        let mut bytes = vec![0u8; size_of::<ForkStackEvent>()];
        let mut put = |at: usize, value: &[u8]| bytes[at..at + value.len()].copy_from_slice(value);
        put(0, &(EventKind::ForkStack as u32).to_ne_bytes());
        put(
            std::mem::offset_of!(ForkStackEvent, tgid),
            &100u32.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, tid),
            &101u32.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, pages),
            &pages.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, parent_start_ns),
            &1_000u64.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, ip),
            &0x40_1000u64.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, sp),
            &0x7ffd_0010u64.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, bp),
            &0x7ffd_0100u64.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, base),
            &0x7ffd_0000u64.to_ne_bytes(),
        );
        put(
            std::mem::offset_of!(ForkStackEvent, site),
            &0x5173u64.to_ne_bytes(),
        );
        put(std::mem::offset_of!(ForkStackEvent, stack), &[0xaa; 8]);
        bytes
    }

    #[test]
    fn decodes_a_fork_stack_and_its_key_on_the_fork() {
        let Event::ForkStack(stack) = decode(&fork_stack_record(2)).unwrap() else {
            panic!("not a fork stack");
        };
        let key = StackKey {
            pid: 100,
            tid: 101,
            parent_start_ns: 1_000,
            ip: 0x40_1000,
            sp: 0x7ffd_0010,
            site: 0x5173,
        };
        assert_eq!(stack.key, key);
        assert_eq!(
            (stack.stack.bp, stack.stack.base),
            (0x7ffd_0100, 0x7ffd_0000)
        );
        assert_eq!(stack.stack.bytes.len(), 2 * FORK_STACK_PAGE_BYTES);
        assert_eq!(stack.stack.word(0x7ffd_0000), Some(0xaaaa_aaaa_aaaa_aaaa));
        // A page count the record cannot hold is capped, not trusted.
        let Event::ForkStack(capped) = decode(&fork_stack_record(u32::MAX)).unwrap() else {
            panic!("not a fork stack");
        };
        assert_eq!(
            capped.stack.bytes.len(),
            FORK_STACK_PAGES * FORK_STACK_PAGE_BYTES
        );

        let mut fork = fork_record();
        let Event::Fork(plain) = decode(&as_bytes(&fork)).unwrap() else {
            panic!("not a fork");
        };
        assert_eq!(plain.stack, None, "no capture program, no key");
        assert!(!plain.stack_skipped);
        (fork.flags, fork.stack_ip, fork.stack_sp) = (FORK_FLAG_STACK, 0x40_1000, 0x7ffd_0010);
        fork.stack_site = 0x5173;
        let Event::Fork(with) = decode(&as_bytes(&fork)).unwrap() else {
            panic!("not a fork");
        };
        assert_eq!(with.stack, Some(key));
        assert!(!with.stack_skipped);
        fork.flags |= FORK_FLAG_STACK_SKIPPED;
        let Event::Fork(skipped) = decode(&as_bytes(&fork)).unwrap() else {
            panic!("not a fork");
        };
        assert!(skipped.stack_skipped);
        assert!(!skipped.in_tree);
        fork.flags |= FORK_FLAG_IN_TREE;
        let Event::Fork(in_tree) = decode(&as_bytes(&fork)).unwrap() else {
            panic!("not a fork");
        };
        assert!(in_tree.in_tree && in_tree.stack_skipped);
    }

    #[test]
    fn decodes_a_fork() {
        let Event::Fork(fork) = decode(&as_bytes(&fork_record())).unwrap() else {
            panic!("not a fork");
        };
        assert_eq!(
            (fork.parent_pid, fork.parent_tid, fork.child_pid),
            (100, 101, 200)
        );
        assert_eq!(fork.parent_threads, 3);
        assert_eq!((fork.child_start_ns, fork.parent_start_ns), (4_999, 1_000));
        assert!(!fork.shares_vm);
        assert_eq!(fork.comm, "python3");
    }

    #[test]
    fn decodes_exec_and_exit() {
        let exec = ExecEvent {
            kind: EventKind::Exec as u32,
            pid: 9,
            timestamp_ns: 1,
            comm: *b"true\0\0\0\0\0\0\0\0\0\0\0\0",
        };
        assert_eq!(
            decode(&as_bytes(&exec)).unwrap(),
            Event::Exec(Exec {
                pid: 9,
                timestamp_ns: 1,
                comm: "true".into()
            })
        );
        let exit = ExitEvent {
            kind: EventKind::Exit as u32,
            pid: 9,
            timestamp_ns: 2,
            exit_code: 256,
            _pad: 0,
        };
        assert_eq!(
            decode(&as_bytes(&exit)).unwrap(),
            Event::Exit(Exit {
                pid: 9,
                timestamp_ns: 2,
                exit_code: 256
            })
        );
    }

    #[test]
    fn short_unknown_and_empty_records_are_errors() {
        let bytes = as_bytes(&fork_record());
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Short { .. })
        ));
        assert_eq!(decode(&[]), Err(DecodeError::NoTag(0)));
        assert_eq!(decode(&[1, 0]), Err(DecodeError::NoTag(2)));
        assert_eq!(
            decode(&99u32.to_ne_bytes()),
            Err(DecodeError::UnknownKind(99))
        );
    }

    #[test]
    fn every_prefix_of_every_record_decodes_or_errors() {
        for bytes in [
            as_bytes(&fork_record()),
            as_bytes(&socket_record(AF_INET)),
            fork_stack_record(4),
        ] {
            for len in 0..=bytes.len() {
                let _ = decode(&bytes[..len]);
            }
        }
    }

    fn socket_record(sk_family: u16) -> SharedSocketEvent {
        let mut local_path = [0; monitor_common::UNIX_PATH_LEN];
        local_path[..8].copy_from_slice(b"/run/db\0");
        SharedSocketEvent {
            kind: EventKind::SharedSocket as u32,
            pid: 11,
            other_pid: 10,
            family: 10,
            timestamp_ns: 2,
            other_timestamp_ns: 1,
            socket: 0xffff,
            inode: 777,
            cgroup_id: 1,
            syscall: 44,
            other_syscall: 1,
            sk_family,
            sk_type: 1,
            protocol: 6,
            state: 1,
            direction: DIRECTION_SEND,
            other_direction: monitor_common::DIRECTION_RECV,
            in_tree: 0,
            local_port: 40000,
            peer_port: 5432,
            _pad2: 0,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            peer_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            local_path,
            peer_path: [0; monitor_common::UNIX_PATH_LEN],
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn decodes_shared_sockets_with_readable_addresses() {
        let Event::SharedSocket(s) = decode(&as_bytes(&socket_record(AF_INET))).unwrap() else {
            panic!("not a socket event");
        };
        assert_eq!(
            (s.local.as_str(), s.peer.as_str()),
            ("127.0.0.1:40000", "127.0.0.1:5432")
        );
        assert_eq!((s.first.pid, s.later.pid, s.family), (10, 11, 10));
        assert!(s.later.send && !s.first.send);
        assert_eq!(s.inode, 777);
        assert_eq!(s.comm, "python3");
        assert!(!s.in_tree);
        let mut in_tree = socket_record(AF_INET);
        in_tree.in_tree = 1;
        let Event::SharedSocket(s) = decode(&as_bytes(&in_tree)).unwrap() else {
            panic!()
        };
        assert!(s.in_tree);

        let mut v6 = socket_record(AF_INET6);
        v6.peer_addr = Ipv6Addr::LOCALHOST.octets();
        let Event::SharedSocket(s) = decode(&as_bytes(&v6)).unwrap() else {
            panic!()
        };
        assert_eq!(s.peer, "[::1]:5432");

        let Event::SharedSocket(s) = decode(&as_bytes(&socket_record(AF_UNIX))).unwrap() else {
            panic!()
        };
        assert_eq!((s.local.as_str(), s.peer.as_str()), ("/run/db", ""));
        assert_eq!(unix_path(b"\0hidden\0"), "@hidden");
        assert_eq!(
            unix_path(&[b'x'; 108]).len(),
            108,
            "no NUL: the whole buffer"
        );
    }

    #[test]
    fn comm_without_nul_and_invalid_utf8() {
        assert_eq!(comm_to_string(&[b'a'; COMM_LEN]).len(), COMM_LEN);
        let mut comm = [0u8; COMM_LEN];
        comm[0] = 0xff;
        assert_eq!(comm_to_string(&comm), "\u{fffd}");
    }
}
